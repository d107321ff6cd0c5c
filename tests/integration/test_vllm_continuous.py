"""The vLLM engine's continuous batching: completions submitted one by one, finished ones coming
back as others keep running, a weight swap between decode steps, and `generate` and the sync
probe while such a batch is in flight. Its own module: one vLLM engine per process at a time."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from rlhub.engines.base import SamplingConfig  # noqa: E402
from rlhub.models.build import ModelConfig, build_tiny_moe, load_policy  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.integration]

PROMPTS = [[(i * 13 + j) % 256 for j in range(3 + i % 5)] for i in range(8)]
GREEDY = SamplingConfig(max_new_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def model_path() -> str:
    return str(build_tiny_moe(ModelConfig()))


@pytest.fixture(scope="module")
def engine(model_path):
    from rlhub.engines.vllm_engine import VLLMEngine

    eng = VLLMEngine(model_path, dtype="float32", seed=0, max_model_len=256, kv_cache_gib=1, continuous=True)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def state(model_path):
    model, _ = load_policy(model_path, "float32")
    return {k: v.clone() for k, v in model.state_dict().items()}


def two_token_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights whose greedy choice is token 65 or 66 at every position (the sign of one hidden unit)."""
    new = {k: v.clone() for k, v in state.items()}
    head = "lm_head.weight" if "lm_head.weight" in new else "model.embed_tokens.weight"
    new["model.norm.weight"].zero_()
    new["model.norm.weight"][0] = 1.0
    for name in {head, "model.embed_tokens.weight"}:  # tied: the head is the embedding
        new[name][65, 0], new[name][66, 0] = 100.0, -100.0
    return new


def drain(engine) -> dict:
    out = {}
    while engine.pending():
        for key, completion in engine.poll():
            assert key not in out, f"{key} returned twice"
            out[key] = completion
    return out


def test_streamed_completions_equal_one_generate_call_and_each_comes_back_once(engine, state):
    engine.load_weights(state, 1)
    expected = engine.generate(PROMPTS, GREEDY)
    for i, p in enumerate(PROMPTS[:4]):
        engine.submit(("a", i), p, GREEDY, 24)
    first = engine.poll(min_seconds=0.0)
    assert first, "a poll returns once something finished"
    for i, p in enumerate(PROMPTS[4:], start=4):  # joining the running batch
        engine.submit(("a", i), p, GREEDY, 24)
    got = dict(first) | drain(engine)
    assert sorted(got) == [("a", i) for i in range(len(PROMPTS))]
    for i, c in enumerate(expected):
        assert got[("a", i)].token_ids == c.token_ids
        assert got[("a", i)].versions == [1] * len(c.token_ids)
    assert engine.poll() == [] and engine.pending() == 0


def test_generate_and_the_probe_run_beside_a_batch_in_flight_without_taking_its_completions(engine, state):
    engine.load_weights(state, 2)
    alone = engine.generate(PROMPTS[:2], GREEDY)
    probe = engine.prompt_logprobs(PROMPTS[7] * 3)
    for i, p in enumerate(PROMPTS):
        engine.submit(i, p, GREEDY, 24)
    assert engine.generate(PROMPTS[:2], GREEDY)[1].token_ids == alone[1].token_ids
    assert torch.allclose(engine.prompt_logprobs(PROMPTS[7] * 3), probe, atol=1e-5)
    assert sorted(drain(engine)) == list(range(len(PROMPTS)))


def test_weights_swapped_between_decode_steps_sample_the_tokens_labelled_with_their_version(engine, state):
    engine.load_weights(state, 3)
    before = engine.generate(PROMPTS, GREEDY)
    engine.submit("short", PROMPTS[0], GREEDY, 2)  # finishes first: the swap happens mid-sequence for the others
    for i, p in enumerate(PROMPTS[1:], start=1):
        engine.submit(i, p, GREEDY, 24)
    first = engine.poll(min_seconds=0.0)
    assert [k for k, _ in first] == ["short"]
    engine.load_weights(two_token_head(state), 4)
    got = drain(engine)
    assert sorted(got) == list(range(1, len(PROMPTS)))
    for i, c in got.items():
        v = c.versions
        switch = v.index(4)
        assert 2 <= switch < len(v) and v == [3] * switch + [4] * (len(v) - switch)
        assert c.token_ids[:switch] == before[i].token_ids[:switch]  # the old weights' greedy tokens
        assert set(c.token_ids[switch:]) <= {65, 66}  # the new weights' only choices
    assert any(set(c.token_ids[:2]) - {65, 66} for c in before), "the old weights must not pick 65/66 alone"


@pytest.mark.timeout(300)  # a poll that never ends (the rebuilt engine holding none of its requests) fails here
def test_a_probe_failure_mid_batch_rebuilds_and_every_group_completes(engine, state, model_path):
    """Groups streaming through a continuous engine; a weight load that leaves wrong weights fails its
    probe while they run. The rebuilt engine restarts every request it held, and every admitted group
    reaches the store (or a counted drop) within a deadline, each exactly once by the ledger."""
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhub.datastore import InMemoryDataStore
    from rlhub.envs import make_env
    from rlhub.ledger import reconcile
    from rlhub.models.logprobs import probe_logprobs
    from rlhub.rollout import DataSide, RolloutConfig, RolloutWorker
    from rlhub.weight_sync import InMemoryWeightSync, probe_sequence

    probe = probe_sequence(259)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    sync = InMemoryWeightSync()
    sync.push(state, 10, probe_logprobs(model.eval(), probe))
    cfg = RolloutConfig(engine="vllm", max_new_tokens=24, max_model_len=256, continuous=True)
    store = InMemoryDataStore(prompts_per_step=4, max_staleness=1)
    env = make_env("arithmetic")
    worker = RolloutWorker(0, cfg, 4, 4, engine, env, AutoTokenizer.from_pretrained(model_path), store, sync, DataSide(), probe,
                           max_groups=8)
    worker.step(drain=False)  # loads version 10, admits 8 groups, starts their 32 requests
    assert engine.pending() > 0
    real_load = engine.load_weights

    def corrupting_load(st, version):  # once: a load that leaves wrong weights, as a broken update would
        engine.load_weights = real_load
        real_load({k: v * 0.5 for k, v in st.items()}, version)

    engine.load_weights = corrupting_load
    sync.push(state, 11, sync.latest.probe_logprobs)  # the same weights again, as version 11
    deadline = time.monotonic() + 180
    while worker.open or worker.in_env:
        assert time.monotonic() < deadline, f"{len(worker.open)} groups still open after 180 s"
        worker.step(drain=False)
    assert worker.stats.sync_rebuilds == 1 and worker.stats.sync_failures == 0 and worker.stats.syncs == 2
    assert engine.stats.extra["restarted_requests"] > 0 and engine.pending() == 0
    trained = []
    while (batch := store.get_batch(4, 1)) is not None:
        trained += [m for m, _ in batch]
        for _, tensors in batch:  # a request running at the failed load restarted: one version per sample
            for versions, mask in zip(tensors.versions, tensors.completion_mask.bool()):
                assert len(set(versions[mask].tolist())) == 1 and int(versions[mask][0]) in (10, 11)
    events = store.take_events() + [{"event": "trained", "group": m.group_id, "row": m.prompt_index, "actor": 0, "version": 1, "step": 2}
                                    for m in trained]
    ledger = reconcile(sorted(events, key=lambda e: e.get("t", float("inf"))))
    assert ledger.ok and ledger.issued == 8 and ledger.trained + sum(ledger.dropped.values()) == 8, ledger


def test_a_poll_with_a_time_slice_returns_before_long_completions_finish(engine, state):
    # several policies' engines take turns (rlhub.rollout.turns.stream): a slice ends the poll whatever is running
    engine.load_weights(state, 5)
    engine.submit("long", PROMPTS[1], GREEDY, 24)
    assert engine.poll(max_seconds=0.0) == [] and engine.pending() == 1  # one decode step, nothing finished yet
    got = drain(engine)
    assert list(got) == ["long"] and len(got["long"].token_ids) > 1
