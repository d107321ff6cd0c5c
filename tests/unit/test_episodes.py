"""Multi-turn episodes: token layout and loss weights, versions across turns, chat rendering,
environment calls off the engine's thread (async, timeouts, bad rewards), limits."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from rlhub.datastore import InMemoryDataStore
from rlhub.envs.base import StepResult
from rlhub.episodes import ChatFormat, EnvHung, EnvRunner, EnvTimeout
from rlhub.rollout import DataSide, RolloutConfig, RolloutWorker
from rlhub.weight_sync import InMemoryWeightSync, probe_sequence
from scripted import ScriptedEngine

PROBE = probe_sequence(259)


class ToolTask:
    """Chat prompt; the first answer gets a tool message back, the second ends with reward 1 if it says 4."""

    def __init__(self, step_delay: float = 0.0, turns_to_finish: int = 2):
        self.delay, self.turns_to_finish = step_delay, turns_to_finish
        self.threads: set[str] = set()

    def dataset(self, split):
        return [{"q": f"{i}+{i}"} for i in range(8)]

    def reset(self, row):
        return [{"role": "user", "content": f"what is {row['q']}?"}], {"turn": 0}

    def step(self, state, message):
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        state["turn"] += 1
        if state["turn"] < self.turns_to_finish:
            return StepResult(0.0, done=False, observation=[{"role": "tool", "content": "calc: 4"}])
        return StepResult(1.0 if "4" in message else 0.0, done=True, success="4" in message)


def make_worker(tokenizer, env, engine, **rollout):
    timeout = rollout.pop("env_timeout_s", 5.0)
    cfg = RolloutConfig(max_new_tokens=rollout.pop("max_new_tokens", 4), max_model_len=rollout.pop("max_model_len", 256),
                        prompts_per_batch=rollout.pop("prompts_per_batch", 2), **rollout)
    store = InMemoryDataStore(prompts_per_step=2, max_staleness=100)
    worker = RolloutWorker(0, cfg, 2, 2, engine, env, tokenizer, store, InMemoryWeightSync(), DataSide(), PROBE,
                           env_name="tooltask", env_timeout_s=timeout)
    return worker, store


def test_multi_turn_tokens_loss_weights_and_versions(tokenizer):
    env = ToolTask()
    a1 = tokenizer.encode("x", add_special_tokens=False) + [tokenizer.eos_token_id]
    a2 = tokenizer.encode("4", add_special_tokens=False) + [tokenizer.eos_token_id]
    engine = ScriptedEngine([a1, a2], tokenizer.eos_token_id)
    worker, store = make_worker(tokenizer, env, engine)
    worker.generate_groups([0, 1])
    (meta, t), *_ = store.get_batch(1, 10)
    chat = ChatFormat(tokenizer)
    prompt_ids, _ = chat.prompt(env.reset(env.dataset("train")[meta.prompt_index])[0])
    # an independent route to the same context: the chat template over the whole conversation
    conversation = [*env.reset(env.dataset("train")[meta.prompt_index])[0], {"role": "assistant", "content": "x"},
                    {"role": "tool", "content": "calc: 4"}, {"role": "assistant", "content": "4"}]
    expected = tokenizer.apply_chat_template(conversation, tokenize=False)
    row = t.input_ids[0][t.attention_mask[0].bool()].tolist()
    assert tokenizer.decode(row) == expected.rstrip("\n")  # the template's newline after the last turn is not generated
    p = len(prompt_ids)
    mask, versions, old = t.completion_mask[0], t.versions[0], t.old_logprobs[0]
    obs = len(row) - p - len(a1) - len(a2)
    assert obs > 0
    want_mask = [0.0] * (p - 1) + [1.0] * len(a1) + [0.0] * obs + [1.0] * len(a2)
    assert mask[: len(want_mask)].tolist() == want_mask and mask[len(want_mask):].sum() == 0
    # each turn keeps the version of the weights that generated it (call 1: version 0, call 2: version 1)
    assert versions[p - 1 : p - 1 + len(a1)].tolist() == [0] * len(a1)
    assert versions[p - 1 + len(a1) + obs : len(want_mask)].tolist() == [1] * len(a2)
    assert (versions[mask == 0] == -1).all() and (old[mask == 0] == 0).all() and (old[mask == 1] == -0.5).all()
    assert meta.min_version == 0 and meta.max_version == 1 and meta.num_tokens == 2 * (len(a1) + len(a2))
    assert float(t.rewards[0]) == 1.0 and meta.extra["turns_mean"] == 2.0
    # the second call saw the first answer and the tool message as its prompt
    assert engine.calls[1][1][0] == row[: p + len(a1) + obs]


def test_turn_and_token_limits_end_episodes_with_their_last_reward(tokenizer):
    a = tokenizer.encode("x", add_special_tokens=False) + [tokenizer.eos_token_id]
    worker, store = make_worker(tokenizer, ToolTask(turns_to_finish=99), ScriptedEngine([a], tokenizer.eos_token_id), max_turns=3)
    worker.generate_groups([0])
    (meta, t), = store.get_batch(1, 10)
    assert meta.extra["turns_mean"] == 3 and worker.stats.truncated == {"max_turns": 2}
    assert t.rewards.tolist() == [0.0, 0.0]  # the reward the environment gave the unfinished episode
    long = tokenizer.encode("abcdef", add_special_tokens=False)
    engine = ScriptedEngine([long], tokenizer.eos_token_id)
    worker, store = make_worker(tokenizer, ToolTask(turns_to_finish=99), engine, max_turns=10, max_new_tokens=6, max_episode_tokens=10)
    worker.generate_groups([0])
    (meta, t), = store.get_batch(1, 10)
    assert worker.stats.truncated == {"max_tokens": 2} and meta.num_tokens == 2 * 10
    assert engine.calls[1][2] == [4, 4]  # the second turn was given what was left of the budget


def test_raw_text_prompts_keep_the_single_turn_protocol(tokenizer):
    class Plain:
        def dataset(self, split):
            return [{"p": "2+2="}]

        def reset(self, row):
            return row["p"], "4"

        def step(self, state, message):
            return StepResult(float(message == state))

    a = tokenizer.encode("4", add_special_tokens=False) + [tokenizer.eos_token_id]
    engine = ScriptedEngine([a], tokenizer.eos_token_id)
    worker, store = make_worker(tokenizer, Plain(), engine)
    worker.generate_groups([0])
    (meta, t), = store.get_batch(1, 10)
    assert engine.calls[0][1][0] == tokenizer.encode("2+2=", add_special_tokens=False)  # no template around raw text
    assert t.rewards.tolist() == [1.0, 1.0] and len(engine.calls) == 1


def test_async_steps_timeouts_and_bad_rewards_drop_only_their_samples(tokenizer):
    class Mixed:
        def __init__(self):
            self.calls = 0

        def dataset(self, split):
            return [{"i": i} for i in range(4)]

        def reset(self, row):
            return f"{row['i']}?", row["i"]

        async def step(self, state, message):
            await asyncio.sleep(0.01)
            return {0: StepResult(1.0), 1: StepResult(float("nan")), 2: StepResult("high"), 3: None}[state]

    a = tokenizer.encode("1", add_special_tokens=False) + [tokenizer.eos_token_id]
    worker, store = make_worker(tokenizer, Mixed(), ScriptedEngine([a], tokenizer.eos_token_id), prompts_per_batch=4)
    worker.generate_groups([0, 1, 2, 3])
    groups = store.get_batch(1, 10)
    assert [m.prompt_index for m, _ in groups] == [0]
    assert worker.stats.dropped == {"nonfinite_reward": 2, "bad_reward": 4}
    reports = worker.stats.failure_reports
    assert {r["error"] for r in reports} == {"ValueError", "BadReward"} and all(r["env"] == "tooltask" for r in reports)
    assert any("'i': 2" in r["row"] for r in reports)

    class Hangs(Mixed):
        def step(self, state, message):
            if state == 1:
                time.sleep(3)
            return StepResult(1.0)

    worker, store = make_worker(tokenizer, Hangs(), ScriptedEngine([a], tokenizer.eos_token_id), prompts_per_batch=4, env_timeout_s=0.3)
    start = time.monotonic()
    worker.generate_groups([0, 1, 2, 3])
    assert time.monotonic() - start < 2.5  # waited for the deadline, not for the hung call
    assert worker.stats.dropped == {"env_timeout": 2} and worker.stats.env_errors == {"EnvTimeout": 2}
    assert sorted(m.prompt_index for m, _ in store.get_batch(3, 10)) == [0, 2, 3]


def test_a_slow_environment_does_not_stall_generation(tokenizer):
    env = ToolTask(step_delay=0.4, turns_to_finish=1)
    a = tokenizer.encode("4", add_special_tokens=False) + [tokenizer.eos_token_id]
    engine = ScriptedEngine([a], tokenizer.eos_token_id)
    worker, store = make_worker(tokenizer, env, engine, prompts_per_batch=2)
    worker.step(drain=False)
    worker.step(drain=False)  # the first batch is still with the environment: the second is generated meanwhile
    assert len(engine.calls) == 2 and engine.calls[1][0] - engine.calls[0][0] < 0.3
    assert all(name.startswith("rlhub-env") for name in env.threads) and env.threads
    worker.drain()
    assert store.stats()["produced"] == 4


def test_env_runner_deadline_for_plain_and_async_calls():
    runner = EnvRunner(timeout_s=0.2, workers=1)

    async def slow():
        await asyncio.sleep(5)

    for fn in (slow, lambda: time.sleep(1)):
        call = runner.submit(fn)
        with pytest.raises(EnvTimeout):
            runner.result(call)
    # the async call was cancelled; the plain one holds the pool's one thread: its process has to end
    assert runner.stuck("step") == 1
    with pytest.raises(EnvHung, match="1 step calls of the environment still run past env.timeout_s=0.2 s, holding all 1 threads"):
        runner.submit(lambda: 7)
    assert runner.result(runner.submit(lambda: 8, lane="reset")) == 8  # the other pool is free
    time.sleep(1)  # the stuck call ends: its thread is back
    assert runner.stuck("step") == 0 and runner.result(runner.submit(lambda: 7)) == 7
    runner.close()


def test_chat_format_observation_tokens_follow_the_template(tokenizer):
    chat = ChatFormat(tokenizer)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ids, new = chat.observation(history, "more", finished=True)
    assert tokenizer.decode(ids) == "\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n"
    # an answer cut at the length limit has no end-of-turn token: the observation closes the turn
    ids, _ = chat.observation(history, [{"role": "tool", "content": "7"}], finished=False)
    assert tokenizer.decode(ids).startswith("<|im_end|>\n<|im_start|>tool\n7")
    with pytest.raises(ValueError, match="role 'robot'"):
        chat.observation(history, [{"role": "robot", "content": "7"}], finished=True)
    with pytest.raises(TypeError, match="string"):
        chat.observation(None, [{"role": "user", "content": "7"}], finished=True)


def test_evaluation_counts_rows_solved_and_failures(tokenizer):
    from rlhub.evaluation import evaluate

    answers = ["4", "5", "4", "4", "boom", "6"]

    class Rows:
        def dataset(self, split):
            return [{"answer": a} for a in answers]

        def reset(self, row):
            if row["answer"] == "boom":
                raise RuntimeError("a broken eval row")
            return "q?", row["answer"]

        def step(self, state, message):
            return StepResult(float(message == state), success=message == state)

    a = tokenizer.encode("4", add_special_tokens=False) + [tokenizer.eos_token_id]
    engine = ScriptedEngine([a], tokenizer.eos_token_id)
    worker, store = make_worker(tokenizer, Rows(), engine)
    result = evaluate(worker, Rows().dataset("test"), k=3)
    solved = sum(x == "4" for x in answers) / len(answers)  # the engine always answers 4
    assert result["eval/pass@1"] == pytest.approx(solved) and result["eval/pass@3"] == pytest.approx(solved)
    assert result["eval/reward_mean"] == pytest.approx(solved) and result["eval/failed"] == 1 + 3
    greedy_call, sampled_call = engine.calls[0], engine.calls[1]
    assert len(greedy_call[1]) == 5 and len(sampled_call[1]) == 15  # one greedy episode per row that started, then k each
    assert greedy_call[3] == 0.0 and sampled_call[3] == worker.sampling.temperature == 1.0
    assert store.stats()["produced"] == 0  # evaluation puts nothing in the store
    # in a run, an evaluation's environment failures are eval/failed, not the training counters
    errors, generated = dict(worker.stats.env_errors), worker.stats.generated_tokens
    worker._evaluate(step=1, rows=0, k=3)
    assert worker.eval_results[-1]["eval/failed"] == 4 and worker.stats.env_errors == errors
    assert worker.stats.generated_tokens == generated


def test_a_model_judge_adds_its_yes_no_score_to_the_reward(tokenizer, tiny_model_path):
    from transformers import AutoModelForCausalLM

    from rlhub.judge import Judge, JudgeConfig, LocalJudgeClient

    class Plain:
        def dataset(self, split):
            return [{"p": "2+2=", "answer": "4"}, {"p": "3+3=", "answer": "6"}]

        def reset(self, row):
            return row["p"], row["answer"]

        def step(self, state, message):
            return StepResult(float(message == state))

    cfg = JudgeConfig(model=tiny_model_path, template="Q {prompt} A {completion} ({answer}) ok?", weight=0.5)
    a = tokenizer.encode("4", add_special_tokens=False) + [tokenizer.eos_token_id]
    worker, store = make_worker(tokenizer, Plain(), ScriptedEngine([a], tokenizer.eos_token_id))
    worker.groups.judge, worker.groups.judge_cfg = LocalJudgeClient(Judge(cfg)), cfg
    worker.generate_groups([0, 1])
    groups = {m.prompt_index: t for m, t in store.get_batch(2, 10)}
    # the score recomputed by an independent route: one unpadded forward of the plain model per text
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    yes, no = tokenizer.encode("yes", add_special_tokens=False)[0], tokenizer.encode("no", add_special_tokens=False)[0]
    for index, row in enumerate(Plain().dataset("train")):
        text = f"Q {row['p']} A 4 ({row['answer']}) ok?"
        with torch.no_grad():
            logits = model(torch.tensor([tokenizer.encode(text, add_special_tokens=False)])).logits[0, -1]
        p_yes = float(torch.softmax(logits[[yes, no]], -1)[0])
        env_reward = float(row["answer"] == "4")
        assert groups[index].rewards.tolist() == pytest.approx([env_reward + 0.5 * p_yes] * 2, abs=1e-5)
    assert worker.stats.judged == 4


def test_an_episode_out_of_budget_ends_before_the_observation_it_could_not_answer(tokenizer):
    a = tokenizer.encode("abc", add_special_tokens=False) + [tokenizer.eos_token_id]
    worker, store = make_worker(tokenizer, ToolTask(turns_to_finish=99), ScriptedEngine([a], tokenizer.eos_token_id),
                                max_new_tokens=4, max_episode_tokens=4)
    worker.generate_groups([0])
    (meta, t), = store.get_batch(1, 10)
    # only the assistant's four tokens follow the prompt, all of them with the loss: no tool message was added
    assert meta.num_tokens == 2 * 4 and t.completion_mask.sum() == 2 * 4 and (t.versions[t.completion_mask == 1] == 0).all()
    assert worker.stats.truncated == {"max_tokens": 2}


def test_groups_whose_samples_all_failed_skip_the_judge(tokenizer):
    class Broken(ToolTask):
        def step(self, state, message):
            raise ValueError("no")

    class NeverReady:
        def __init__(self):
            self.sent, self.handles = [], []

        def submit(self, texts):
            self.sent.append(texts)
            self.handles.append(object())
            return self.handles[-1]

        def ready(self, handle):  # as Ray's wait: only for something it handed out
            assert handle in self.handles, f"asked about {handle!r}, which was never sent"
            return False

        def result(self, handle):
            raise AssertionError("nothing was sent to the judge")

    a = tokenizer.encode("4", add_special_tokens=False) + [tokenizer.eos_token_id]
    worker, store = make_worker(tokenizer, Broken(), ScriptedEngine([a], tokenizer.eos_token_id))
    worker.groups.judge, worker.groups.judge_cfg = NeverReady(), None
    for _ in range(4):  # each round polls the judge first
        worker.step(drain=False)
    worker.drain()
    assert worker.groups.judge.sent == [] and not worker.groups.judging
    dropped = store.stats()["dropped"]
    assert list(dropped) == ["env_error"] and dropped["env_error"] >= 2


@pytest.mark.parametrize("wrapped", [False, True])
def test_an_async_reset_gets_each_rows_index(tokenizer, wrapped):
    """`reset(row, index=...)`: the position of the row in its split, for an async reset, bare or behind
    rows from `env.dataset` (WithRows); the reward checks the index against the row."""
    from rlhub.envs.registry import WithRows
    from rlhub.datastore import prompt_index

    class Indexed:
        def __init__(self):
            self.seen: list[tuple[int, int]] = []

        def dataset(self, split):
            return [{"i": 10 * i} for i in range(6)]

        async def reset(self, row, index):
            await asyncio.sleep(0.01)
            self.seen.append((index, row["i"]))
            return f"{row['i']}?", (index, row["i"])

        def step(self, state, message):
            index, value = state
            return StepResult(1.0 if value == 10 * index else 0.0)

    inner = Indexed()
    env = WithRows(inner, {"train": inner.dataset("train")}) if wrapped else inner
    a = tokenizer.encode("1", add_special_tokens=False) + [tokenizer.eos_token_id]
    worker, store = make_worker(tokenizer, env, ScriptedEngine([a], tokenizer.eos_token_id), prompts_per_batch=4)
    worker.generate_groups([0, 1, 2, 3])
    assert sorted(inner.seen) == sorted((prompt_index(g, 6, 0), 10 * prompt_index(g, 6, 0)) for g in range(4))
    assert all(reward == 1.0 for _, group in store.get_batch(4, 10) for reward in group.rewards.tolist())


class PerTurn:
    """Two turns, each paid: 0.25 for the first, then 1 or 0 for the second (alternating, so that a
    group's two samples differ)."""

    def __init__(self):
        self.finished = 0

    def dataset(self, split):
        return [{"q": f"{i}+{i}"} for i in range(4)]

    def reset(self, row):
        return [{"role": "user", "content": f"what is {row['q']}?"}], {"turn": 0}

    def step(self, state, message):
        state["turn"] += 1
        if state["turn"] == 1:
            return StepResult(0.25, done=False, observation=[{"role": "tool", "content": "try again"}])
        self.finished += 1
        return StepResult(float(self.finished % 2), done=True)


@pytest.mark.parametrize("estimator", ["reinforce_pp", "grpo"])
def test_every_turns_reward_reaches_the_return_and_a_token_level_estimator(tokenizer, estimator):
    """The return is the sum of the turns' rewards; REINFORCE++'s reward-to-go gives the first turn's
    tokens both turns' rewards and the second turn's only its own, while an outcome estimator (GRPO)
    puts one advantage, from the returns, on every token of a sample."""
    turn_ids = tokenizer.encode("xy", add_special_tokens=False) + [tokenizer.eos_token_id]
    cfg = RolloutConfig(max_new_tokens=4, max_model_len=256, prompts_per_batch=1)
    store = InMemoryDataStore(prompts_per_step=1, max_staleness=100)
    worker = RolloutWorker(0, cfg, 2, 1, ScriptedEngine([turn_ids], tokenizer.eos_token_id), PerTurn(), tokenizer, store,
                           InMemoryWeightSync(), DataSide(advantage=estimator), PROBE, env_name="perturn")
    worker.generate_groups([0])
    (_, batch), = store.get_batch(1, 10)
    assert batch.rewards.tolist() == [1.25, 0.25]  # 0.25 + 1 and 0.25 + 0
    for i, total in enumerate(batch.rewards.tolist()):
        generated = batch.completion_mask[i].nonzero().flatten()
        first, second = batch.advantages[i, generated[:len(turn_ids)]], batch.advantages[i, generated[len(turn_ids):]]
        assert len(first) == len(second) == len(turn_ids)
        if estimator == "reinforce_pp":
            assert first.tolist() == [total] * len(turn_ids) and second.tolist() == [total - 0.25] * len(turn_ids)
        else:  # GRPO over the returns [1.25, 0.25]: +1 and -1 on every token
            assert torch.allclose(torch.cat([first, second]), torch.full((2 * len(turn_ids),), 1.0 if i == 0 else -1.0), atol=1e-4)
    assert batch.turn_rewards is None  # read on the rollout side, not sent to the learner


def test_once_every_environment_thread_is_held_by_a_hung_call_the_worker_ends(tokenizer):
    hang = threading.Event()

    class HangsTwice:
        """Row 1's two samples step forever (until the test ends); every other step answers at once."""

        def dataset(self, split):
            return [{"i": i} for i in range(4)]

        def reset(self, row):
            return f"{row['i']}?", row["i"]

        def step(self, state, message):
            if state == 1:
                hang.wait()
            return StepResult(1.0)

    a = tokenizer.encode("1", add_special_tokens=False) + [tokenizer.eos_token_id]
    worker, store = make_worker(tokenizer, HangsTwice(), ScriptedEngine([a], tokenizer.eos_token_id), prompts_per_batch=4,
                                env_timeout_s=0.3)
    worker.envs.workers = 2  # two threads a pool: the two hung steps hold both
    try:
        worker.generate_groups([0, 1, 2, 3])
        assert worker.stats.dropped == {"env_timeout": 2}  # row 1's two samples; the other groups went to the store
        with pytest.raises(EnvHung, match="2 step calls of the environment still run past env.timeout_s=0.3 s"):
            worker.generate_groups([4, 5])
    finally:
        hang.set()
