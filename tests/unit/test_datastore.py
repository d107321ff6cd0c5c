"""Admission control and the staleness-bounded queue, without Ray."""

import pytest

from rlhub.datastore import Admission, GroupQueue, merge_stats, select_batch
from rlhub.types import GroupMeta


def meta(gid: int, version: int, t: float) -> GroupMeta:
    return GroupMeta(gid, gid, 0, version, version, 2, 4, 0.5, 0.5, 2.0, 0.1, put_time=t)


def test_admission_limit_follows_learner_version():
    adm = Admission(prompts_per_step=4, max_staleness=1)
    assert adm.admit(0, 100) == list(range(8))  # (0 + 1 + 1) * 4
    assert adm.admit(1, 3) == []
    adm.set_version(1)
    assert adm.admit(1, 3) == [8, 9, 10]
    assert adm.admit(0, 5) == [11]


def test_admission_staleness_zero_is_one_batch_ahead():
    adm = Admission(prompts_per_step=3, max_staleness=0)
    assert adm.admit(0, 10) == [0, 1, 2]
    assert adm.admit(0, 10) == []


def test_admission_requeues_crashed_actor_first_and_stops():
    adm = Admission(prompts_per_step=2, max_staleness=0)
    adm.admit(0, 1)
    adm.admit(1, 1)
    assert adm.requeue_actor(0) == [0]
    adm.requeue([0], "actor_crash")
    adm.set_version(1)
    assert adm.admit(2, 2) == [0, 2]  # the lost one first
    adm.stopped = True
    assert adm.admit(2, 1) is None


def test_admission_state_round_trip_restarts_in_flight():
    adm = Admission(prompts_per_step=2, max_staleness=1)
    adm.admit(0, 3)
    adm.finish(1)
    state = adm.state_dict()
    fresh = Admission(prompts_per_step=2, max_staleness=1)
    fresh.load_state_dict(state)
    assert fresh.cursor == 3
    assert fresh.admit(0, 2) == [0, 2]


def test_admission_rejects_negative_staleness():
    with pytest.raises(ValueError, match="max_staleness"):
        Admission(2, -1)


def test_queue_drops_stale_and_counts():
    q = GroupQueue()
    q.put(meta(0, version=0, t=1.0), "a")
    q.put(meta(1, version=2, t=2.0), "b")
    assert [g for _, g in q.peek(learner_version=3, max_staleness=2)] == [1]
    assert q.stats()["dropped"] == {"stale": 1}
    taken = q.take([1])
    assert [p for _, p in taken] == ["b"]
    s = q.stats()
    assert s["produced"] == s["consumed"] + sum(s["dropped"].values()) + s["queued"]


def test_a_group_is_queued_once_and_released_groups_are_counted_again():
    q = GroupQueue()
    assert q.put(meta(0, 0, 1.0), "a") and not q.put(meta(0, 0, 2.0), "again")  # a second finish of group 0 is ignored
    q.take([0])
    assert not q.put(meta(0, 0, 3.0), "after training")  # handed to the learner: never queued again...
    q.release([0, 5])  # ...unless its step never happened; 5 is another shard's and changes nothing here
    assert q.stats()["consumed"] == 0 and q.stats()["produced"] == 0
    assert q.put(meta(0, 0, 4.0), "regenerated") and q.stats()["produced"] == 1
    assert [(e["event"], e["reason"]) for e in q.take_events()] == []


def test_queue_sample_drops_and_group_drops_are_counted():
    q = GroupQueue()
    m = meta(0, 0, 1.0)
    m.extra["dropped_samples"] = {"nonfinite_reward": 1}
    q.put(m, None)
    q.count_drop("env_error", groups=1, samples=4)
    s = q.stats()
    assert s["produced"] == 2 and s["dropped"] == {"env_error": 1}
    assert s["dropped_samples"] == {"nonfinite_reward": 1, "env_error": 4}


def test_select_batch_takes_oldest_across_shards():
    cands = [(3.0, 7, 1), (1.0, 4, 0), (2.0, 5, 1)]
    assert select_batch(cands, 2) == [(1.0, 4, 0), (2.0, 5, 1)]
    assert select_batch(cands, 4) is None


def test_merge_stats_sums_shards():
    a = {"produced": 3, "consumed": 1, "queued": 1, "dropped": {"stale": 1}, "dropped_samples": {}}
    b = {"produced": 2, "consumed": 2, "queued": 0, "dropped": {"stale": 1}, "dropped_samples": {"x": 1}}
    m = merge_stats([a, b])
    assert m["produced"] == 5 and m["dropped"] == {"stale": 2} and m["dropped_total"] == 2


def test_dropped_groups_make_room_so_the_learner_never_starves():
    from rlhub.datastore import InMemoryDataStore

    store = InMemoryDataStore(prompts_per_step=2, max_staleness=0)
    ids = store.admit(0, 5)
    assert ids == [0, 1]
    store.drop(0, "env_error", samples=4)  # never reaches a batch
    assert store.admit(0, 5) == [2]  # one more may start, so a batch of 2 can still form
    assert store.admit(0, 5) == []


def test_stale_evictions_make_room_too():
    from rlhub.datastore import InMemoryDataStore

    store = InMemoryDataStore(prompts_per_step=1, max_staleness=0)
    store.admit(0, 1)
    store.put_many([(meta(0, version=0, t=1.0), "old")])
    store.set_version(1)
    assert store.admit(0, 1) == [1]
    assert store.get_batch(1, learner_version=1) is None  # group 0 is stale at version 1
    assert store.stats()["dropped"] == {"stale": 1}
    assert store.admit(0, 1) == [2]
