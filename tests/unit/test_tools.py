"""The tool protocol (`rlhub.envs.tools`): schemas from functions, the call formats, running calls."""

from __future__ import annotations

import asyncio
import enum
import time
from typing import Literal

import pytest

from rlhub.envs.tools import (FORMATS, Tool, ToolCall, ToolEnv, as_tools, format_call, format_for, instructions, offer, parse,
                              run_calls, template_takes_tools, tool)


# ---- declaring tools ----------------------------------------------------------------------------

class Unit(enum.Enum):
    CELSIUS = "celsius"
    KELVIN = "kelvin"


def weather(city: str, days: int = 1, unit: Unit = Unit.CELSIUS, detail: Literal["short", "long"] = "short",
            tags: list[str] | None = None) -> str:
    """Forecast for a city.

    Spans several lines of description.

    Args:
        city: the city's name
        days (int): how many days, counted
            from today
        unit: temperature unit
        detail: how much to say
        tags: labels to attach

    Returns:
        the forecast text
    """
    return f"{city}:{days}:{unit}:{detail}:{tags}"


def test_a_functions_signature_and_docstring_give_its_schema():
    t = Tool.from_function(weather)
    assert t.name == "weather" and t.description == "Forecast for a city. Spans several lines of description."
    props = t.parameters["properties"]
    assert props["city"] == {"type": "string", "description": "the city's name"}
    assert props["days"] == {"type": "integer", "description": "how many days, counted from today"}
    assert props["unit"] == {"type": "string", "enum": ["celsius", "kelvin"], "description": "temperature unit"}
    assert props["detail"]["enum"] == ["short", "long"]
    assert props["tags"] == {"type": "array", "items": {"type": "string"}, "description": "labels to attach"}
    assert t.parameters["required"] == ["city"]  # every other one has a default
    assert t.schema()["type"] == "function" and t.schema()["function"]["name"] == "weather"


def test_a_parameter_without_a_json_type_is_refused_by_name():
    def no_hint(x):
        return x

    def odd(x: complex) -> None: ...

    def many(x: int | str) -> None: ...

    with pytest.raises(TypeError, match="parameter 'x' has no type annotation"):
        Tool.from_function(no_hint)
    with pytest.raises(TypeError, match="parameter 'x': annotation .*complex.* has no JSON type"):
        Tool.from_function(odd)
    with pytest.raises(TypeError, match="union of 2 types"):
        Tool.from_function(many)
    with pytest.raises(ValueError, match="two tools are named 'weather'"):
        as_tools([weather, weather])
    with pytest.raises(ValueError, match="tool name"):
        Tool("two words", "", {"type": "object", "properties": {}})


def test_arguments_are_checked_against_the_schema():
    t = tool(weather)
    t.check({"city": "Oslo", "days": 2, "unit": "kelvin", "tags": ["a"]})
    t.check({"city": "Oslo", "tags": None})  # an optional argument given as null
    for args, problem in (({}, "missing argument 'city'"), ({"city": "Oslo", "hours": 2}, "unknown argument 'hours'"),
                          ({"city": 3}, "argument 'city': expected string"), ({"city": "x", "days": True}, "expected integer"),
                          ({"city": "x", "unit": "F"}, "is not one of"), ({"city": "x", "tags": ["a", 1]}, "item 1: expected string")):
        with pytest.raises(ValueError, match=problem):
            t.check(args)


# ---- the formats ----------------------------------------------------------------------------------

CALLS = [ToolCall("weather", {"city": "Oslo", "days": 2}), ToolCall("add", {"a": 1, "b": "x;y"})]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_reads_back_the_calls_it_writes(fmt):
    parsed = parse(format_call(CALLS, fmt), fmt)
    assert [(c.name, c.arguments) for c in parsed.calls] == [(c.name, c.arguments) for c in CALLS]
    assert not parsed.errors and not parsed.is_final
    final = parse("The answer is 42.", fmt)
    assert final.is_final and final.content == "The answer is 42."


def test_hermes_keeps_the_text_around_calls_and_names_each_malformed_call():
    text = ('Let me check.\n<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
            '<tool_call>{"name": "weather", "arguments": {"city": </tool_call>'
            '<tool_call>{"arguments": {}}</tool_call><tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>'
            '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>')
    parsed = parse(text, "hermes")
    assert parsed.content == "Let me check."
    assert [(c.name, c.arguments) for c in parsed.calls] == [("weather", {"city": "Oslo"}), ("add", {"a": 1})]
    assert len(parsed.errors) == 3
    assert "call 2 is not valid JSON" in parsed.errors[0] and 'call 3 needs a "name"' in parsed.errors[1]
    assert 'call 4 (add): "arguments" must be a JSON object' in parsed.errors[2]
    cut = parse('<tool_call>{"name": "weather", "argum', "hermes")  # cut off by the token budget
    assert not cut.calls and "not closed" in cut.errors[0] and not cut.is_final


def test_llama3_and_mistral_malformed_calls_are_errors_not_answers():
    assert parse('<|python_tag|>{"name": "add", "parameters": {"a": 1}', "llama3_json").errors
    assert parse('{"name": "add"', "llama3_json").errors
    assert parse("[TOOL_CALLS] [{'name': 'add'}]", "mistral").errors[0].startswith("the calls after [TOOL_CALLS] are not")
    assert parse('[TOOL_CALLS] "add"', "mistral").errors
    with pytest.raises(ValueError, match="tool format 'xml'"):
        parse("x", "xml")


# ---- running calls --------------------------------------------------------------------------------

async def slow_add(a: int, b: int) -> int:
    """Add, slowly."""
    await asyncio.sleep(0.4)
    return a + b


def blocking_mul(a: int, b: int) -> dict:
    """Multiply, blocking."""
    time.sleep(0.4)
    return {"product": a * b}


def broken(x: int) -> int:
    """Always fails."""
    raise RuntimeError(f"row {x} is bad")


async def hangs() -> str:
    """Never answers."""
    await asyncio.sleep(60)
    return "never"


def test_a_turns_calls_run_at_once_and_every_failure_is_a_result():
    tools = as_tools([slow_add, blocking_mul, broken, hangs])
    calls = [ToolCall("slow_add", {"a": 1, "b": 2}, "c1"), ToolCall("blocking_mul", {"a": 3, "b": 4}, "c2"),
             ToolCall("slow_add", {"a": 5, "b": 6}, "c3"), ToolCall("broken", {"x": 7}, "c4"), ToolCall("hangs", {}, "c5"),
             ToolCall("nope", {}, "c6"), ToolCall("slow_add", {"a": "1", "b": 2}, "c7")]
    start = time.monotonic()
    results = asyncio.run(run_calls(calls, tools, timeout_s=1.0))
    elapsed = time.monotonic() - start
    assert elapsed < 1.8  # one deadline, not the sum of 0.4 + 0.4 + 0.4 + 1.0
    assert [r.content for r in results[:3]] == ["3", '{"product": 12}', "11"] and all(r.ok for r in results[:3])
    assert results[3].content == "error: broken raised RuntimeError: row 7 is bad"
    assert results[4].content == "error: hangs gave no result within 1 s"
    assert results[5].content.startswith("error: no tool named 'nope'")
    assert results[6].content == "error: slow_add: argument 'a': expected integer, got str \"1\""
    assert not any(r.ok for r in results[3:])
    assert results[1].message() == {"role": "tool", "name": "blocking_mul", "tool_call_id": "c2", "content": '{"product": 12}'}


# ---- offering tools through a real chat template -----------------------------------------------

def test_the_tiny_models_chatml_template_gets_the_tools_as_a_system_message(tokenizer):
    tools = as_tools([slow_add, weather])
    assert format_for(tokenizer) == "hermes" and not template_takes_tools(tokenizer)
    messages, schemas = offer([{"role": "user", "content": "What is 2+3?"}], tools, tokenizer)
    assert schemas is None and messages[0]["role"] == "system" and messages[1]["content"] == "What is 2+3?"
    assert messages[0]["content"] == instructions(tools, "hermes")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert '"name": "slow_add"' in text and "<tool_call>" in text and text.endswith("<|im_start|>assistant\n")
    merged, _ = offer([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], tools, tokenizer)
    assert len(merged) == 2 and merged[0]["content"].startswith("Be brief.\n\nTools you can call:")


def test_a_call_sampled_as_tokens_reads_back_after_decoding(tokenizer):
    """The environment sees the decoded completion (special tokens removed): the call must survive it."""
    text = format_call([ToolCall("weather", {"city": "Zürich", "days": 3})], "hermes")
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    parsed = parse(tokenizer.decode(ids, skip_special_tokens=True), "hermes")
    assert [(c.name, c.arguments) for c in parsed.calls] == [("weather", {"city": "Zürich", "days": 3})]


class TemplateWithTools:
    """A tokenizer whose template renders `tools` (as Qwen's does), for `offer`'s other branch."""

    chat_template = "{{ tools }}"

    def apply_chat_template(self, messages, tools=None, tokenize=False, add_generation_prompt=True):
        return f"{tools}|{messages}"


def test_a_template_that_renders_tools_gets_them_through_tools():
    tools = as_tools([slow_add])
    messages, schemas = offer([{"role": "user", "content": "hi"}], tools, TemplateWithTools())
    assert messages == [{"role": "user", "content": "hi"}] and schemas == [tools[0].schema()]


# ---- ToolEnv: a tool task in a few lines ------------------------------------------------------------

class Shop(ToolEnv):
    """Two tools: a price lookup (async) and a multiplier; the answer is the cost of n items."""

    max_tool_calls = 3

    @staticmethod
    async def price(item: str) -> float:
        """The price of one item.

        Args:
            item: what to price
        """
        prices = {"apple": 0.5, "pear": 0.75}
        if item not in prices:
            raise KeyError(f"no price for {item}")
        return prices[item]

    @staticmethod
    def multiply(a: float, b: float) -> float:
        """a times b."""
        return a * b

    tools = (price, multiply)

    def prompt(self, row):
        return f"What do {row['n']} {row['item']}s cost?"

    def check(self, row, answer):
        return answer.strip() == row["answer"]


def test_a_tool_env_offers_its_tools_runs_calls_and_scores_the_final_answer(tokenizer):
    from rlhub.envs.base import ModelMessage
    from rlhub.episodes import ChatFormat, check_messages

    env, chat = Shop(), ChatFormat(tokenizer)
    row = {"item": "pear", "n": 4, "answer": "3.0"}
    prompt, state = env.reset(row)
    ids, history = chat.prompt(prompt)
    text = tokenizer.decode(ids)
    assert '"name": "price"' in text and '"name": "multiply"' in text and "What do 4 pears cost?" in text
    assert history[0]["role"] == "system" and history[-1]["content"] == "What do 4 pears cost?"

    calls = format_call([ToolCall("price", {"item": "pear"}), ToolCall("price", {"item": "plum"})], chat.tool_format) + "<tool_call>{"
    first = asyncio.run(env.step(state, ModelMessage(calls, "stop", (), chat.tool_format)))
    assert not first.done and first.reward == 0.0 and first.info == {"tool_calls": 3, "tool_errors": 2}
    contents = [m["content"] for m in check_messages(first.observation, "observation")]
    assert contents[0] == "0.75" and contents[1] == "error: price raised KeyError: 'no price for plum'"
    assert contents[2].startswith("error: call 3 is not valid JSON")
    obs_ids, _ = chat.observation([*history, {"role": "assistant", "content": calls}], first.observation, finished=True)
    assert "<|im_start|>tool\n0.75<|im_end|>" in tokenizer.decode(obs_ids)

    over = asyncio.run(env.step(dict(state), ModelMessage(format_call([ToolCall("multiply", {"a": 4, "b": 0.75})]), "stop")))
    assert over.done and over.reward == 0.0 and over.info["ended"] == "max_tool_calls"  # 3 calls already, a 4th is one too many
    right = asyncio.run(env.step({"row": row, "calls": 0}, ModelMessage("3.0", "stop")))
    wrong = asyncio.run(env.step({"row": row, "calls": 0}, ModelMessage("3.5", "stop")))
    cut = asyncio.run(env.step({"row": row, "calls": 0}, ModelMessage("3.0", "length")))
    assert (right.reward, right.success, wrong.reward, cut.reward, cut.info["ended"]) == (1.0, True, 0.0, 0.0, "cut_off")


def test_a_prompt_mapping_with_unknown_keys_is_refused(tokenizer):
    from rlhub.episodes import ChatFormat

    with pytest.raises(TypeError, match="a mapping prompt is"):
        ChatFormat(tokenizer).prompt({"messages": [{"role": "user", "content": "x"}], "tool": []})
