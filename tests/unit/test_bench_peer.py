"""`rlhub bench peer` without TRL: the TRL-side reward against the environment's, the rolling-success
arithmetic against an independent computation, and the TRL spec's prompts against what rlhub's
rollout worker feeds its engine."""

from __future__ import annotations

import numpy as np
import pytest

from rlhub.benches import peer, trl_grpo
from rlhub.benches.trl_grpo import arithmetic_reward, make_reward_func
from rlhub.envs.arithmetic import ArithmeticEnv
from rlhub.envs.base import ModelMessage

EOS = 258


def _trl_reward(env: ArithmeticEnv, answer: str, text: str, finished: bool, chat: bool = False) -> float:
    """The reward through TRL's calling convention: one completion, its ids ending in EOS when it ended its turn."""
    fn = make_reward_func([EOS], env.match)
    completion = [{"role": "assistant", "content": text}] if chat else text
    return fn(prompts=["p"], completions=[completion], completion_ids=[[55, EOS] if finished else [55, 56]], answer=[answer])[0]


@pytest.mark.parametrize("match", ["exact", "last_number"])
def test_trl_reward_agrees_with_the_environment_on_edge_cases(match: str) -> None:
    env = ArithmeticEnv(ops=("max", "+"), max_operand=12, match=match)
    texts = ["{a}", " {a}\n", "{w}", "-{a}", "{a}{a}", "{a}.", "{a} is it", "the answer is {a}", "{a} or {w}", "{w} then {a}",
             "3+4={a}", "", "{a}x", "x{a}y", "{a} 0"]
    seen = set()
    for row in env.dataset("train")[:20]:
        prompt, state = env.reset(row)
        wrong = str(int(state) + 1)
        for template in texts:
            text = template.format(a=state, w=wrong)
            for finished in (True, False):
                want = env.step(state, ModelMessage(text, "stop" if finished else "length")).reward
                assert arithmetic_reward(text, finished, row["answer"], match) == want, (text, finished)
                assert _trl_reward(env, row["answer"], text, finished, chat=match == "last_number") == want, (text, finished)
                seen.add(want)
    assert seen == {0.0, 1.0}  # the cases reach both outcomes
    # the rule's edge cases, stated: no reward without the end of turn, none for a wrong or padded-with-text answer
    answer = env.reset(env.dataset("train")[0])[1]
    assert _trl_reward(env, answer, answer, finished=False) == 0.0
    assert _trl_reward(env, answer, str(int(answer) + 1), finished=True) == 0.0
    extra = 0.0 if match == "exact" else 1.0  # extra text: wrong for the exact rule, fine when the answer is the last number
    assert _trl_reward(env, answer, f"{answer} is it", finished=True) == extra
    assert _trl_reward(env, answer, f"so {answer}", finished=True) == extra
    assert _trl_reward(env, answer, f"{answer} not {int(answer) + 1}", finished=True) == 0.0


def test_peer_check_catches_a_reward_that_disagrees(monkeypatch: pytest.MonkeyPatch, tiny_model_path: str, tmp_path) -> None:
    from rlhub.config import load_config

    cfg = load_config(["prompts_per_step=4", "group_size=2"])
    spec = peer.build_spec(cfg, tiny_model_path, 1, tmp_path)
    assert peer.check_reward_agreement(cfg, spec) > 0
    lenient = lambda eos_ids, match, record=None: (lambda completions, **kw: [1.0 if str(c).strip() else 0.0 for c in completions])
    monkeypatch.setattr(trl_grpo, "make_reward_func", lenient)  # ignores the answer and the end of turn
    with pytest.raises(RuntimeError, match="disagrees"):
        peer.check_reward_agreement(cfg, spec)


def test_rolling_success_and_time_to_against_an_independent_computation() -> None:
    rng = np.random.default_rng(0)
    step_s = rng.uniform(0.2, 0.6, size=40)
    success = np.clip(np.linspace(0.0, 1.0, 40) + rng.normal(0, 0.05, 40), 0, 1)
    curve = peer.rolling_curve(step_s.tolist(), success.tolist(), window=10)
    wall = np.cumsum(step_s)
    full = np.convolve(success, np.ones(10) / 10, mode="valid")  # full windows: steps 10..40
    partial = np.cumsum(success[:9]) / np.arange(1, 10)  # the first nine points: the steps so far
    expected = np.concatenate([partial, full])
    np.testing.assert_allclose([w for w, _ in curve], wall, atol=1e-3)
    np.testing.assert_allclose([v for _, v in curve], expected, atol=1e-4)
    for level in (0.5, 0.7):
        first = int(np.argmax(full >= level)) + 9  # index of the first full window at the level
        assert full[first - 9] >= level and not (full[: first - 9] >= level).any()
        assert peer.time_to(curve, level, 10) == pytest.approx(wall[first], abs=1e-3)
    assert peer.time_to(curve, 1.01, 10) is None


def test_time_to_ignores_early_partial_windows() -> None:
    success = [1.0, 1.0] + [0.6] * 10
    curve = peer.rolling_curve([1.0] * 12, success, window=10)
    assert curve[:2] == [[1.0, 1.0], [2.0, 1.0]]  # partial windows, drawn but not counted
    assert curve[9] == [10.0, 0.68]  # the first full window: (2 + 8 * 0.6) / 10
    assert peer.time_to(curve, 0.5, 10) == 10.0
    assert peer.time_to(curve, 0.7, 10) is None  # only the partial windows were above 0.7


def test_side_result_and_ratios() -> None:
    trl = peer.side_result([3.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], 32)
    rl = peer.side_result([5.0, 0.5, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0], 32)
    assert trl["step_s"] == pytest.approx(1.0) and trl["samples_per_s"] == pytest.approx(32.0)  # steps 3 and 4 (2 skipped)
    assert rl["samples_per_s"] == pytest.approx(64.0)
    r = peer.ratios(trl, rl)
    assert r["samples_per_s_ratio"] == pytest.approx(2.0)
    assert r["time_to_ratio"] == {"0.5": None, "0.7": None}  # four steps never fill a window


@pytest.mark.parametrize("chat", [False, True])
def test_spec_prompt_ids_are_what_the_rollout_worker_feeds(chat: bool, tiny_model_path: str, tokenizer, tmp_path) -> None:
    from rlhub.config import load_config
    from rlhub.datastore import InMemoryDataStore
    from rlhub.envs.registry import build_env
    from rlhub.rollout import DataSide, RolloutWorker
    from rlhub.weight_sync import InMemoryWeightSync, probe_sequence
    from scripted import ScriptedEngine

    overrides = ["prompts_per_step=3", "group_size=2", "seed=5"] + (["env.kwargs.chat=true", "env.kwargs.system_prompt=Brief"] if chat else [])
    cfg = load_config(overrides)
    spec = peer.build_spec(cfg, tiny_model_path, 2, tmp_path)
    env = build_env(cfg.env, cfg.seed)
    store = InMemoryDataStore(cfg.prompts_per_step, max_staleness=100, num_rows=len(env.dataset("train")), seed=cfg.seed)
    engine = ScriptedEngine([[tokenizer.eos_token_id]], tokenizer.eos_token_id)
    worker = RolloutWorker(0, cfg.rollout, cfg.group_size, cfg.prompts_per_step, engine, env, tokenizer, store, InMemoryWeightSync(),
                           DataSide(), probe_sequence(259), seed=cfg.seed)
    worker.step()
    worker.step()
    fed = [ids for _, prompts, _, _ in engine.calls for ids in prompts]  # two generate calls: groups 0-2, then 3-5
    want = [row["prompt_ids"] for row in spec["rows"] for _ in range(cfg.group_size)]
    assert len(spec["rows"]) == 2 * cfg.prompts_per_step
    assert fed == want
    if chat:  # the chat template rendered the system and user messages
        assert spec["rows"][0]["prompt_ids"][:1] == tokenizer.encode("<|im_start|>", add_special_tokens=False)
        assert isinstance(spec["rows"][0]["prompt"], list)


def test_trl_args_follow_the_grpo_preset() -> None:
    from rlhub.config import load_config

    cfg = load_config([])
    args = peer.trl_args(cfg, 7)
    assert args["loss_type"] == "grpo" and args["scale_rewards"] == "group"  # seq_mean_token_mean, group std
    assert args["per_device_train_batch_size"] * args["gradient_accumulation_steps"] == cfg.prompts_per_step * cfg.group_size
    assert args["per_device_train_batch_size"] == min(cfg.algorithm.micro_batch_size, 256)
    assert (args["learning_rate"], args["max_completion_length"], args["num_generations"]) == (cfg.algorithm.lr, 4, cfg.group_size)
    assert (args["beta"], args["lr_scheduler_type"], args["shuffle_dataset"], args["max_steps"]) == (0.0, "constant", False, 7)
    assert args["router_aux_loss_coef"] == cfg.moe.aux_loss_coef
    assert args["gradient_checkpointing"] is False  # TRL's own default is True: ~20% slower steps that rlhub does not pay
    with pytest.raises(ValueError, match="GRPO-family"):
        peer.trl_args(load_config(["algorithm=gspo"]), 1)


def test_parse_args_keeps_rlhub_overrides_apart() -> None:
    parsed = peer.parse_args(["configs=generation", "steps=3", "rlhub.rollout.engine=vllm", "rlhub_overrides=max_staleness=2 seed=1"])
    assert parsed.configs == ["generation"] and parsed.steps == 3
    assert parsed.rlhub_overrides == ["rollout.engine=vllm", "max_staleness=2", "seed=1"]
    with pytest.raises(ValueError):
        peer.parse_args(["configs=nope"])


@pytest.mark.parametrize("targets", [["attention", "router"], ["attention", "experts", "router"]])
def test_the_trl_side_gets_the_same_adapters_and_precision_through_peft(tiny_model_path: str, targets: list[str]) -> None:
    """peft's LoraConfig from `peft_spec`, put on the model TRL trains, adapts the weights rlhub's adapters
    adapt (`rlhub.lora.apply`), and trains the routers in full where rlhub does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhub import lora
    from rlhub.config import load_config
    from rlhub.models.config import LoraConfig as RlhubLora

    cfg = load_config(["experiment=smollm2_moe_lora", f"model.lora.targets=[{','.join(targets)}]"])
    assert peer.trl_args(cfg, 3)["bf16"] and not peer.trl_args(load_config([]), 3)["bf16"]
    assert peer.peft_spec(load_config([])) is None
    spec = peer.peft_spec(cfg)
    assert (spec["r"], spec["lora_alpha"]) == (cfg.model.lora.rank, cfg.model.lora.alpha)

    ours = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    adapted = lora.apply(ours, RlhubLora(rank=4, alpha=8.0, targets=targets))
    theirs = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32), LoraConfig(**{**spec, "r": 4}))
    trained = {n for n, p in theirs.named_parameters() if p.requires_grad}

    def peft_adapts(weight: str) -> bool:
        module, _, leaf = weight.rpartition(".")
        if adapted[weight] == "full":  # a router: peft trains its own copy (modules_to_save)
            return any(f"{module}.modules_to_save." in n for n in trained)
        if adapted[weight] == "experts":  # a stacked expert weight: peft's parameter adapter sits on its module
            return any(f"{module}.lora_A." in n for n in trained)
        return any(f"{module}.lora_A." in n for n in trained)

    assert adapted and all(peft_adapts(w) for w in adapted)
    per_kind = {k: sum(1 for v in adapted.values() if v == k) for k in set(adapted.values())}
    assert per_kind.get("full", 0) == sum(1 for n in trained if ".modules_to_save." in n and n.endswith("weight"))
