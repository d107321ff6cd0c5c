"""Task data through `datasets`, reward functions as environments, finding environments by name, evaluation."""

from __future__ import annotations

import json

import pytest

from rlhub.config import ConfigError, load_config
from rlhub.data import DataError, DatasetConfig, load_rows, write_jsonl
from rlhub.envs import ModelMessage
from rlhub.envs.registry import build_env

ROWS = [{"question": f"{i}+1=", "answer": str(i + 1), "level": i % 3} for i in range(40)]


@pytest.fixture()
def files(tmp_path):
    import datasets

    write_jsonl(ROWS, tmp_path / "rows.jsonl")
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    ds.to_csv(str(tmp_path / "rows.csv"), index=False)
    datasets.DatasetDict({"train": ds.select(range(30)), "test": ds.select(range(30, 40))}).save_to_disk(str(tmp_path / "saved"))
    return tmp_path


def as_list(rows):
    return [dict(rows[i]) for i in range(len(rows))]


def test_the_same_rows_from_jsonl_parquet_csv_and_save_to_disk(files):
    by_format = {name: as_list(load_rows(DatasetConfig(path=str(files / name)))["train"]) for name in ("rows.jsonl", "rows.parquet", "rows.csv")}
    assert by_format["rows.jsonl"] == ROWS
    assert by_format["rows.parquet"] == ROWS
    # csv has no types: the answer column comes back as integers, the rows otherwise the same
    assert [{**r, "answer": str(r["answer"])} for r in by_format["rows.csv"]] == ROWS
    saved = load_rows(DatasetConfig(path=str(files / "saved"), eval_split="test"))
    assert as_list(saved["train"]) == ROWS[:30] and as_list(saved["test"]) == ROWS[30:]


def test_a_directory_of_files_named_by_split_holds_those_splits(tmp_path):
    write_jsonl(ROWS[:30], tmp_path / "d" / "train.jsonl")
    write_jsonl(ROWS[30:], tmp_path / "d" / "test.jsonl")
    rows = load_rows(DatasetConfig(path=str(tmp_path / "d"), eval_split="test"))
    assert as_list(rows["train"]) == ROWS[:30] and as_list(rows["test"]) == ROWS[30:]  # held-out rows are not trained on
    with pytest.raises(DataError, match=r"has splits \['test', 'train'\], not 'validation'"):
        load_rows(DatasetConfig(path=str(tmp_path / "d"), eval_split="validation"))


def test_columns_eval_rows_and_limit(files):
    rows = load_rows(DatasetConfig(path=str(files / "rows.jsonl"), columns={"prompt": "question"}, eval_size=8), required=["prompt"], seed=3)
    train, test = as_list(rows["train"]), as_list(rows["test"])
    assert len(train) == 32 and len(test) == 8 and all("prompt" in r for r in train)
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in test})
    again = load_rows(DatasetConfig(path=str(files / "rows.jsonl"), columns={"prompt": "question"}, eval_size=8), required=["prompt"], seed=3)
    assert as_list(again["test"]) == test  # held out with the seed: the same rows every time
    other = load_rows(DatasetConfig(path=str(files / "rows.jsonl"), eval_size=8), seed=4)
    assert [r["question"] for r in as_list(other["test"])] != [r["prompt"] for r in test]
    assert len(load_rows(DatasetConfig(path=str(files / "rows.jsonl"), limit=5))["train"]) == 5


@pytest.mark.parametrize("cfg, message", [
    (dict(path="{d}/missing.jsonl"), "missing.jsonl'?: no such file"),
    (dict(path="{d}/empty.jsonl"), "is empty"),
    (dict(path="{d}/rows.jsonl", columns={"prompt": "text"}), "env.dataset.columns.prompt='text'.*no column 'text'.*question"),
    (dict(path="{d}/rows.jsonl"), r"lacks column\(s\) \['prompt'\].*env.dataset.columns.prompt=COLUMN"),
    (dict(path="{d}/saved", eval_split="validation"), "has splits \\['test', 'train'\\], not 'validation'"),
    (dict(path="{d}/rows.jsonl", eval_split="test"), "local files hold one split"),
    (dict(path="{d}/rows.jsonl", eval_size=40, columns={"prompt": "question"}), "leaves no training rows"),
    (dict(path="{d}/broken.jsonl"), "broken.jsonl'?: cannot be read as json"),
])
def test_bad_data_is_named(files, cfg, message):
    (files / "empty.jsonl").write_text("")
    (files / "broken.jsonl").write_text('{"prompt": 1}\n{"prompt": ')
    cfg = {k: v.format(d=files) if isinstance(v, str) else v for k, v in cfg.items()}
    with pytest.raises(DataError, match=message):
        load_rows(DatasetConfig(**cfg), required=["prompt"])


def test_a_reward_function_is_a_whole_environment(files):
    cfg = load_config(["env=reward_fn", "env.kwargs.fn=rlhub.envs.reward_fn:exact_match", f"env.dataset.path={files}/rows.parquet",
                       "env.dataset.columns.prompt=question", "env.dataset.eval_size=4"])
    assert cfg.env.name == "reward_fn"  # no conf/env/reward_fn.yaml: env=NAME selected it by name
    env = build_env(cfg.env, cfg.seed)
    row = env.dataset("train")[0]
    prompt, state = env.reset(row)
    assert prompt == row["prompt"]
    right = env.step(state, ModelMessage(row["answer"], "stop"))
    assert (right.reward, right.success) == (1.0, True) and env.step(state, ModelMessage("x", "stop")).reward == 0.0
    assert len(env.dataset("test")) == 4
    with pytest.raises(DataError, match="reward function: its rows come from env.dataset.path"):
        build_env(load_config(["env=reward_fn", "env.kwargs.fn=rlhub.envs.reward_fn:exact_match"]).env)
    with pytest.raises(ValueError, match="module:function"):
        build_env(load_config(["env=reward_fn", "env.kwargs.fn=exact_match"]).env)
    with pytest.raises(ConfigError, match="env.name='nope': no such environment; installed: .*countdown"):
        load_config(["env=nope"])


def test_envs_list_and_show(capsys):
    from rlhub.cli import main

    assert main(["envs", "list"]) == 0
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    for name in ("arithmetic", "countdown", "gsm8k_style", "calculator_tools", "shop_tools", "python_code", "reasoning_gym", "reward_fn"):
        assert name in listed and "rlhub 0.1.0" in listed[name] and "cannot load" not in listed[name]
    assert main(["envs", "show", "calculator_tools", "max_tool_calls=3"]) == 0
    out = capsys.readouterr().out
    assert "max_tool_calls = 3  (given; default 2)" in out and "tool_format = 'auto'" in out and "sample row:" in out
    assert '"name": "calculator"' in out  # the prompt offers the tool
    assert main(["envs", "--help"]) == 0 and "envs show NAME" in capsys.readouterr().out
    assert main(["envs"]) == 2 and "rlhub envs list" in capsys.readouterr().err
    row = json.loads(out.split("sample row: ")[1].splitlines()[0])
    assert set(row) >= {"question", "answer"}


def test_a_verifiers_style_environment_through_the_adapter(tmp_path, monkeypatch):
    import asyncio

    (tmp_path / "vf_style_task.py").write_text('''
from types import SimpleNamespace

def exact(completion, answer):
    return 1.0 if completion[-1]["content"].strip() == answer else 0.0

async def short(completion, **kwargs):  # async, and takes everything by **kwargs
    return 1.0 if len(completion[-1]["content"]) <= 3 else 0.0

def load_environment(n=4):
    rows = [{"question": f"{i}+{i}?", "answer": str(2 * i)} for i in range(n)]
    return SimpleNamespace(dataset=rows, eval_dataset=rows[:1], system_prompt="Answer briefly.",
                           rubric=SimpleNamespace(funcs=[exact, short], weights=[1.0, 0.2]))
''')
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(["env=verifiers", "env.kwargs.module=vf_style_task", "env.kwargs.args.n=6"])
    env = build_env(cfg.env)
    assert len(env.dataset("train")) == 6 and len(env.dataset("test")) == 1
    prompt, state = asyncio.run(env.reset(env.dataset("train")[3]))
    assert prompt == [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "3+3?"}]
    right = asyncio.run(env.step(state, ModelMessage("6", "stop")))
    long_wrong = asyncio.run(env.step(state, ModelMessage("seven", "stop")))
    assert right.reward == pytest.approx(1.2) and long_wrong.reward == 0.0
    with pytest.raises(ValueError, match="env.kwargs.module='no_such_module'"):
        build_env(load_config(["env=verifiers", "env.kwargs.module=no_such_module"]).env)


VF_MULTI_TURN = '''
from types import SimpleNamespace


class DoubleCheck:
    """In verifiers' multi-turn style: answer, be asked "Are you sure?", answer again; scored on the last answer."""

    max_turns = 4
    system_prompt = "Answer briefly."

    def __init__(self, n):
        self.dataset = [{"question": f"{i}+{i}?", "answer": str(2 * i)} for i in range(n)]
        self.eval_dataset = None
        self.rubric = SimpleNamespace(funcs=[self.last_answer, self.turns_taken], weights=[1.0, 0.1])

    async def setup_state(self, state, **kwargs):
        state["asked"] = 0
        return state

    async def is_completed(self, messages, state, **kwargs):
        return state["asked"] >= 1 and messages[-1]["role"] == "assistant"

    def env_response(self, messages, state, **kwargs):  # a plain method: the adapter awaits either kind
        state["asked"] += 1
        return [{"role": "user", "content": "Are you sure?"}], state

    @staticmethod
    def last_answer(completion, answer):
        return 1.0 if completion[-1]["content"].strip() == answer else 0.0

    @staticmethod
    def turns_taken(state, **kwargs):
        return float(state["turn"])


def load_environment(n=4):
    return DoubleCheck(n)
'''


def test_a_verifiers_style_multi_turn_environment_through_the_adapter(tmp_path, monkeypatch, tokenizer):
    import asyncio

    from rlhub.datastore import InMemoryDataStore
    from rlhub.rollout import DataSide, RolloutConfig, RolloutWorker
    from rlhub.weight_sync import InMemoryWeightSync, probe_sequence
    from scripted import ScriptedEngine

    (tmp_path / "vf_multi_turn.py").write_text(VF_MULTI_TURN)
    monkeypatch.syspath_prepend(str(tmp_path))
    env = build_env(load_config(["env=verifiers", "env.kwargs.module=vf_multi_turn"]).env)
    row = env.dataset("train")[2]
    prompt, state = asyncio.run(env.reset(row))
    assert prompt[-1] == {"role": "user", "content": "2+2?"} and state["vf_state"]["asked"] == 0
    first = asyncio.run(env.step(state, ModelMessage("5", "stop")))
    assert not first.done and first.observation == [{"role": "user", "content": "Are you sure?"}]
    last = asyncio.run(env.step(state, ModelMessage("4", "stop")))
    assert last.done and last.reward == pytest.approx(1.0 + 0.1 * 2)  # the last answer is right, two turns taken
    assert [m["role"] for m in state["vf_state"]["completion"]] == ["assistant", "user", "assistant"]

    eos = tokenizer.eos_token_id
    turns = [tokenizer.encode(t, add_special_tokens=False) + [eos] for t in ("5", "4")]
    store = InMemoryDataStore(prompts_per_step=1, max_staleness=100)
    worker = RolloutWorker(0, RolloutConfig(max_new_tokens=4, max_model_len=256, prompts_per_batch=1), 2, 1,
                           ScriptedEngine(turns, eos), env, tokenizer, store, InMemoryWeightSync(), DataSide(), probe_sequence(259),
                           env_name="verifiers")
    worker.generate_groups([0])
    (meta, t), = store.get_batch(1, 10)
    answer = env.dataset("train")[meta.prompt_index]["answer"]
    assert meta.extra["turns_mean"] == 2.0 and t.rewards.tolist() == pytest.approx([(1.0 if answer == "4" else 0.0) + 0.2] * 2)


def test_a_judge_without_a_model_directory_or_with_a_bad_template_is_refused(tmp_path, tiny_model_path):
    from rlhub.actors.controller import check_judge

    with pytest.raises(ConfigError, match="reward.judge.model=.*config.json missing"):
        check_judge(load_config([f"reward.judge.model={tmp_path}"]))
    with pytest.raises(ConfigError, match="reward.judge.template: KeyError 'question'"):
        check_judge(load_config([f"reward.judge.model={tiny_model_path}", "reward.judge.template='{question} {completion}'"]))
    check_judge(load_config([f"reward.judge.model={tiny_model_path}"]))  # the default template fits


def test_an_environments_shipped_defaults_apply_under_the_command_lines_values(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from rlhub.cli import main
    from rlhub.config import load_config
    from rlhub.envs import env_defaults
    from rlhub.envs import registry

    data = tmp_path / "a dir: with spaces" / "rows.jsonl"  # quoted through Hydra's grammar as it is
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"question": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(30)))

    @env_defaults({"rollout": {"max_turns": 3, "max_new_tokens": 24}, "env.dataset.path": str(data),
                   "env.dataset.columns.prompt": "question", "env.dataset.eval_size": 5, "warm_start.steps": 0})
    def factory(fn: str = "rlhub.envs.reward_fn:exact_match"):
        from rlhub.envs.reward_fn import load_environment

        return load_environment(fn)

    real = registry.available_envs()
    monkeypatch.setattr(registry, "available_envs", lambda: {**real, "shipped": SimpleNamespace(load=lambda: factory)})
    cfg = load_config(["env=shipped", "rollout.max_new_tokens=9"])
    assert (cfg.rollout.max_turns, cfg.rollout.max_new_tokens, cfg.env.dataset.path) == (3, 9, str(data))
    assert cfg.env.dataset.columns == {"prompt": "question"} and cfg.env.dataset.eval_size == 5 and cfg.warm_start.steps == 0
    assert main(["config", "env=shipped", "rollout.max_new_tokens=9"]) == 0
    out = capsys.readouterr().out
    assert "#   rollout.max_turns=3" in out and "rollout.max_new_tokens=24" not in out and "max_new_tokens: 9" in out
    with pytest.raises(ValueError, match="'algorithm.lr' is not an environment's to set"):
        env_defaults({"algorithm.lr": 1.0})
