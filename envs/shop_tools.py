"""Built-in multi-turn task with two tools: look up a price, compute a total, answer.

The user asks `What do 7 pears cost, in cents?`. Two tools (`rlhub.envs.tools`):

    async def price(item: str) -> int          # the price of one item in cents; an error for one not sold
    def calculator(expression: str) -> str     # numbers, + - * / and parentheses (calculator_tools' evaluator)

The prices are in the shop's list, not in the prompt, so the task cannot be solved without `price`;
the product can be computed with `calculator` or by the model itself. A turn without a call is the
final answer: reward 1 and success when it is the row's total in cents exactly (after stripping)
and the model ended its turn. At most `max_tool_calls` calls per episode (4), as `ToolEnv` counts
them. The settings it needs (four turns, 64 new tokens a turn, a 1024-token context) come with it.

Rows are {"question", "item", "count", "answer"} from `envs/data/shop_tools.jsonl` and
`shop_tools_test.jsonl`, written by `write_data` (run this module to rewrite them): every item of the
list with counts 2..12, shuffled with a seed, a fifth held out.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Mapping

from rlhub.envs.calculator_tools import ShippedToolEnv, calculator
from rlhub.envs.registry import env_defaults
from rlhub.envs.tools import ToolCall, format_call, schemas

DATA = Path(__file__).parent / "data"
NAME = "shop_tools"
PRICES = {"apple": 45, "pear": 60, "plum": 35, "fig": 120, "lemon": 55, "melon": 310, "peach": 80, "kiwi": 40,
          "mango": 150, "grape": 5, "cherry": 8, "orange": 70}
"""The shop's list: cents per item."""
INSTRUCTIONS = "You work at a shop. Look prices up with the tools. Reply with the final answer alone: a whole number of cents."
FORMAT = "hermes"


async def price(item: str) -> int:
    """The price of one item, in cents.

    Args:
        item: the item's name, singular, e.g. pear
    """
    key = item.strip().lower()
    if key not in PRICES:
        raise KeyError(f"the shop does not sell {item!r}")
    return PRICES[key]


def write_data(directory: Path = DATA, low: int = 2, high: int = 12, test_fraction: float = 0.2, seed: int = 0) -> tuple[Path, Path]:
    """The task's train and test files: every item with every count in low..high, shuffled with `seed`."""
    from rlhub.data import write_jsonl

    rows = [{"question": f"What do {n} {item}s cost, in cents?", "item": item, "count": n, "answer": str(n * cents)}
            for item, cents in PRICES.items() for n in range(low, high + 1)]
    random.Random(seed).shuffle(rows)
    n_test = max(1, int(len(rows) * test_fraction))
    directory = Path(directory)
    return write_jsonl(rows[n_test:], directory / f"{NAME}.jsonl"), write_jsonl(rows[:n_test], directory / f"{NAME}_test.jsonl")


class ShopToolsEnv(ShippedToolEnv):
    """Totals of a shop's prices, looked up with one tool and computed with another (module docstring)."""

    task, instructions = NAME, INSTRUCTIONS
    tools = (price, calculator)

    def check(self, row: Mapping[str, Any], answer: str) -> bool:
        return answer.strip() == str(row["answer"])

    def format_examples(self, n: int, rng: random.Random) -> list[tuple[Any, str]]:
        """(prompt, answer) pairs of the three turn shapes, with values that ignore the prompt: a price
        lookup of another item, a calculator call after a lookup, a final answer after both (a random
        total). Never the prompt's own item or answer."""
        rows = self._splits["train"]
        fmt = FORMAT if self.tool_format == "auto" else self.tool_format
        tools = schemas(self.tool_list())
        pairs: list[tuple[Any, str]] = []
        for _ in range(n):
            row = rows[rng.randrange(len(rows))]
            prompt, _ = self.reset(row)
            other = rng.choice([item for item in PRICES if item != row["item"]])
            lookup = format_call([ToolCall("price", {"item": other}, "call_1")], fmt)
            shape = rng.randrange(3)
            if shape == 0:
                pairs.append((prompt, lookup))
                continue
            count = rng.randint(2, 12)
            messages = [*prompt["messages"], {"role": "assistant", "content": lookup},
                        {"role": "tool", "name": "price", "tool_call_id": "call_1", "content": str(PRICES[other])}]
            compute = format_call([ToolCall("calculator", {"expression": f"{count}*{PRICES[other]}"}, "call_2")], fmt)
            if shape == 1:
                pairs.append(({"messages": messages, "tools": tools}, compute))
                continue
            messages += [{"role": "assistant", "content": compute},
                         {"role": "tool", "name": "calculator", "tool_call_id": "call_2", "content": str(count * PRICES[other])}]
            total = str(rng.randint(2, 12) * rng.choice(list(PRICES.values())))
            pairs.append(({"messages": messages, "tools": tools}, total if total != row["answer"] else str(int(total) + 1)))
        return pairs


@env_defaults({"rollout.max_turns": 4, "rollout.max_new_tokens": 64, "rollout.max_model_len": 1024})
def load_environment(max_tool_calls: int = 4, system_prompt: str | None = None, tool_format: str = "auto") -> ShopToolsEnv:
    """A shop's totals with two tools: look a price up (price), compute (calculator); multi-turn."""
    return ShopToolsEnv(max_tool_calls=max_tool_calls, system_prompt=system_prompt, tool_format=tool_format)


if __name__ == "__main__":
    print(*write_data(), sep="\n")
