"""The calculator_tools environment (a tool-call episode by hand and through the rollout worker, the
shipped rows, format examples) and the reasoning_gym environment (two tasks, splits, threads)."""

from __future__ import annotations

import asyncio
import copy
import doctest
import json
import random
import re
import tempfile
import threading
from pathlib import Path

import pytest

from rlhub.datastore import InMemoryDataStore
from rlhub.envs import calculator_tools, reasoning_gym_env
from rlhub.envs.base import ModelMessage
from rlhub.envs.calculator_tools import DATA, CalcError, evaluate, write_data
from rlhub.envs.tools import ToolCall, format_call, parse
from rlhub.envs.registry import WithRows
from rlhub.rollout import DataSide, RolloutConfig, RolloutWorker
from rlhub.weight_sync import InMemoryWeightSync, probe_sequence
from scripted import ScriptedEngine


@pytest.fixture(scope="module")
def calc():
    return calculator_tools.load_environment()


@pytest.fixture(scope="module")
def arithmetic_gym():
    return reasoning_gym_env.load_environment("basic_arithmetic")


def call(expression: str, finish: str = "stop") -> ModelMessage:
    return ModelMessage(format_call([ToolCall("calculator", {"expression": expression})]), finish)


def step(env, state, message):
    return asyncio.run(env.step(state, message))


# ---- calculator_tools ---------------------------------------------------------------------------

def test_calculator_episode_by_hand(calc):
    row = calc.dataset("train")[0]
    prompt, start = calc.reset(row)
    assert prompt["messages"][-1] == {"role": "user", "content": row["question"]}
    assert [t["function"]["name"] for t in prompt["tools"]] == ["calculator"]
    assert prompt["tools"][0]["function"]["parameters"]["properties"]["expression"]["type"] == "string"
    state = copy.deepcopy(start)
    first = step(calc, state, call(row["expression"]))
    assert (first.done, first.reward) == (False, 0.0)
    assert [(m["role"], m["name"], m["content"]) for m in first.observation] == [("tool", "calculator", row["answer"])]
    last = step(calc, state, ModelMessage(f" {row['answer']}\n"))
    assert (last.done, last.reward, last.success) == (True, 1.0, True)
    wrong = step(calc, copy.deepcopy(start), ModelMessage(str(int(row["answer"]) + 1)))
    assert (wrong.done, wrong.reward, wrong.success) == (True, 0.0, False)
    cut = step(calc, copy.deepcopy(start), ModelMessage(row["answer"], finish_reason="length"))
    assert (cut.done, cut.reward, cut.success) == (True, 0.0, False)


def test_malformed_calls_and_refused_expressions_get_an_error_and_the_episode_goes_on(calc, tmp_path):
    state = calc.reset(calc.dataset("train")[0])[1]
    messages = ['<tool_call>{"name": "calculator", "arguments": {"expression": 12</tool_call>',
                '<tool_call>{"name": "calculator", "arguments": {"expr": "1+1"}}</tool_call>',
                '<tool_call>{"name": "calculator", "arguments": {"expression": 7}}</tool_call>',
                '<tool_call>{"name": "calc", "arguments": {"expression": "1+1"}}</tool_call>',
                str(call("1/0")), str(call("2**8"))]
    for message in messages:
        result = step(calc, copy.deepcopy(state), ModelMessage(message))
        assert not result.done and result.reward == 0.0
        (tool,) = result.observation
        assert tool["role"] == "tool" and tool["content"].startswith("error: "), message
    marker = tmp_path / "ran"
    attack = f"__import__('os').system('touch {marker}')"
    result = step(calc, copy.deepcopy(state), call(attack))
    assert "not allowed" in result.observation[0]["content"] and not marker.exists()
    for expression in (attack, "(lambda: 1)()", "x", "1 if 1 else 2", "[1][0]", "1e999", "9" * 300):
        with pytest.raises(CalcError):
            evaluate(expression)
    assert evaluate("-(3+4)*2/4") == -3.5 and calculator_tools.calculator("1/3") == "0.333333"


def test_tool_call_limit_and_the_shipped_settings():
    from rlhub.config import load_config

    env = calculator_tools.load_environment(max_tool_calls=1)
    state = env.reset(env.dataset("test")[0])[1]
    first = step(env, state, call("1+1"))
    assert not first.done and first.observation[0]["content"] == "2"
    again = step(env, state, call("1+1"))
    assert again.done and again.reward == 0.0 and again.info == {"ended": "max_tool_calls"}
    assert doctest.testmod(calculator_tools).failed == 0
    cfg = load_config(["experiment=calculator_tools"])  # the experiment selects the env, which brings its settings
    assert (cfg.rollout.max_turns, cfg.rollout.max_new_tokens, cfg.rollout.max_model_len) == (3, 64, 1024)
    assert load_config(["env=calculator_tools", "rollout.max_new_tokens=80"]).rollout.max_new_tokens == 80


def test_shipped_rows_are_right_by_two_routes_and_rewritten_identically(tmp_path):
    env = calculator_tools.load_environment()
    train, test = env.dataset("train"), env.dataset("test")
    assert 100 <= len(train) <= 3000 and len(test) >= 20
    assert not {r["expression"] for r in train} & {r["expression"] for r in test}
    python = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for row in [*train, *test]:
        a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)", row["expression"]).groups()
        assert row["answer"] == str(python[op](int(a), int(b))) == calculator_tools.render(evaluate(row["expression"]))
        assert row["question"] == f"What is {row['expression']}?"
    written = write_data(tmp_path)
    assert [p.read_text() for p in written] == [(DATA / p.name).read_text() for p in written]


def test_format_examples_have_both_shapes_and_never_the_prompts_own_values(calc):
    rows = {r["question"]: r for r in calc.dataset("train")}
    pairs = calc.format_examples(400, random.Random(0))
    first = final = 0
    for prompt, answer in pairs:
        messages = prompt["messages"]
        row = rows[messages[1]["content"]]
        if messages[-1]["role"] == "user":  # a first turn: a well-formed call with another expression
            first += 1
            (made,) = parse(answer, "hermes").calls
            assert made.name == "calculator" and made.arguments["expression"] != row["expression"]
        else:  # a final turn after a call and its result
            final += 1
            assert messages[-2]["role"] == "assistant" and messages[-1]["role"] == "tool"
            assert re.fullmatch(r"-?\d+", answer) and answer != row["answer"]
            assert parse(messages[-2]["content"], "hermes").calls[0].arguments["expression"] != row["expression"]
    assert first > 100 and final > 100


def test_calculator_episode_through_the_rollout_worker(tokenizer, calc):
    row = calc.dataset("train")[0]
    env = WithRows(calc, {"train": [row], "test": []})
    eos = tokenizer.eos_token_id
    turns = [tokenizer.encode(text, add_special_tokens=False) + [eos] for text in (str(call(row["expression"])), row["answer"])]
    engine = ScriptedEngine(turns, eos)
    cfg = RolloutConfig(max_new_tokens=96, max_model_len=1024, prompts_per_batch=1)
    store = InMemoryDataStore(prompts_per_step=1, max_staleness=100)
    worker = RolloutWorker(0, cfg, 2, 1, engine, env, tokenizer, store, InMemoryWeightSync(), DataSide(),
                           probe_sequence(259), env_name="calculator_tools", env_timeout_s=5.0)
    worker.generate_groups([0])
    (meta, t), = store.get_batch(1, 10)
    assert t.rewards.tolist() == [1.0, 1.0] and meta.extra["turns_mean"] == 2.0
    ids = t.input_ids[0][t.attention_mask[0].bool()].tolist()
    assert '"name": "calculator"' in tokenizer.decode(ids[:60 + len(ids) // 2])  # the tool was offered in the prompt
    weight = t.completion_mask[0][: len(ids) - 1].tolist()  # weight[j] is the loss weight of token ids[j + 1]
    trained = [i for i, w in zip(ids[1:], weight) if w == 1.0]
    assert trained == turns[0] + turns[1]
    first_end = weight.index(1.0) + len(turns[0])
    between = ids[first_end + 1 : first_end + 1 + weight[first_end:].index(1.0)]
    assert all(w == 0.0 for w in weight[first_end : first_end + len(between)])
    assert tokenizer.decode(between) == f"\n<|im_start|>tool\n{row['answer']}<|im_end|>\n<|im_start|>assistant\n"
    assert engine.calls[1][1][0][-len(between):] == between  # the second turn saw the tool's answer


# ---- shop_tools: two tools ----------------------------------------------------------------------

def test_shop_episode_needs_the_price_tool_and_may_compute_with_the_other():
    from rlhub.envs import shop_tools

    env = shop_tools.load_environment()
    row = env.dataset("train")[0]
    prompt, state = env.reset(row)
    assert [t["function"]["name"] for t in prompt["tools"]] == ["price", "calculator"]
    assert str(shop_tools.PRICES[row["item"]]) not in prompt["messages"][-1]["content"]  # the price is not in the question
    looked = step(env, state, ModelMessage(format_call([ToolCall("price", {"item": row["item"]}), ToolCall("price", {"item": "car"})])))
    assert [m["content"] for m in looked.observation] == [str(shop_tools.PRICES[row["item"]]), "error: price raised KeyError: \"the shop does not sell 'car'\""]
    computed = step(env, state, ModelMessage(format_call([ToolCall("calculator", {"expression": f"{row['count']}*{shop_tools.PRICES[row['item']]}"})])))
    assert computed.observation[0]["content"] == row["answer"] == str(row["count"] * shop_tools.PRICES[row["item"]])
    final = step(env, state, ModelMessage(row["answer"]))
    assert (final.done, final.reward, final.success) == (True, 1.0, True)
    over = step(env, {"row": row, "calls": 3}, ModelMessage(format_call([ToolCall("price", {"item": "fig"})] * 2)))
    assert over.done and over.info == {"ended": "max_tool_calls"}


def test_shop_format_examples_cover_three_turn_shapes_without_the_prompts_values():
    from rlhub.envs import shop_tools

    env = shop_tools.load_environment()
    rows = {r["question"]: r for r in env.dataset("train")}
    shapes = {0: 0, 1: 0, 2: 0}
    for prompt, answer in env.format_examples(300, random.Random(1)):
        messages = prompt["messages"]
        row = rows[messages[1]["content"]]
        shape = sum(m["role"] == "tool" for m in messages)
        shapes[shape] += 1
        if shape < 2:
            (made,) = parse(answer, "hermes").calls
            assert made.name == ("price" if shape == 0 else "calculator")
        else:
            assert answer.isdigit() and answer != row["answer"]
        looked = [parse(m["content"], "hermes").calls[0] for m in messages if m["role"] == "assistant"]
        assert all(c.arguments.get("item") != row["item"] for c in looked)
    assert min(shapes.values()) > 60
    written = shop_tools.write_data(Path(tempfile.mkdtemp()))
    assert [p.read_text() for p in written] == [(shop_tools.DATA / p.name).read_text() for p in written]


# ---- reasoning_gym ------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["basic_arithmetic", "leg_counting"])
def test_reasoning_gym_tasks_score_their_own_answers(task, arithmetic_gym):
    env = arithmetic_gym if task == "basic_arithmetic" else reasoning_gym_env.load_environment(task, size=200, test_size=20)
    rows = env.dataset("train")
    assert json.loads(json.dumps(list(rows[:50]))) == list(rows[:50])  # plain JSON, as rows travel between processes
    for row in rows[:20]:
        prompt, state = env.reset(copy.deepcopy(row))
        assert prompt == [{"role": "user", "content": row["question"]}]
        answer = env.entries[row["index"]]["answer"]
        right = env.step(copy.deepcopy(state), ModelMessage(f" {answer}\n"))
        assert (right.reward, right.success, right.done) == (1.0, True, True)
        assert env.step(state, ModelMessage(f"so <answer>{answer}</answer>")).reward == 1.0
        wrong = env.step(state, ModelMessage(f"<answer>{answer}9</answer>"))
        assert wrong.reward < 1.0 and not wrong.success
        assert env.step(state, ModelMessage(answer, finish_reason="length")).reward == 0.0
    examples = env.format_examples(200, random.Random(1))
    by_question = {r["question"]: r for r in rows}
    assert all(a != env.entries[by_question[p[-1]["content"]]["index"]]["answer"] for p, a in examples)


def test_reasoning_gym_splits_are_disjoint_and_rows_checked(arithmetic_gym):
    train, test = arithmetic_gym.dataset("train"), arithmetic_gym.dataset("test")
    assert train and test and not {r["question"] for r in train} & {r["question"] for r in test}
    assert not {r["index"] for r in train} & {r["index"] for r in test}
    big = reasoning_gym_env.load_environment("count_bits", size=300, test_size=30, seed=3)
    assert (len(big.dataset("train")), len(big.dataset("test"))) == (300, 30)  # a large task space: no duplicates
    with pytest.raises(ValueError, match="not this environment's entry"):
        big.reset({"question": "something else", "index": 0})


def test_reasoning_gym_unknown_task_names_it_and_some_real_ones():
    with pytest.raises(ValueError, match=r"task='no_such_task'.*basic_arithmetic"):
        reasoning_gym_env.load_environment("no_such_task")


def test_reasoning_gym_from_a_worker_thread():
    out = {}

    def run():
        env = reasoning_gym_env.load_environment("chain_sum", size=100, test_size=10, min_terms=2, max_terms=2)
        row = env.dataset("train")[0]
        _, state = env.reset(row)
        out["reward"] = env.step(state, ModelMessage(env.entries[row["index"]]["answer"])).reward

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert out["reward"] == 1.0
