"""Checkpoints are whole or absent, the newest wins, old ones are pruned."""

from rlhub.checkpoint import latest_checkpoint, list_checkpoints, read_state, write_checkpoint


def write_weights(d):
    (d / "policy.bin").write_bytes(b"w")


def test_latest_and_pruning(tmp_path):
    for v in (2, 4, 6):
        write_checkpoint(tmp_path, v, write_weights, {"store": {"cursor": v * 10}}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000004", "step_000006"]
    assert read_state(latest_checkpoint(tmp_path)) == {"version": 6, "store": {"cursor": 60}}


def test_interrupted_write_is_never_read(tmp_path):
    write_checkpoint(tmp_path, 1, write_weights, {}, keep_last=3)

    def crash(d):
        (d / "half").write_bytes(b"x")
        raise KeyboardInterrupt

    try:
        write_checkpoint(tmp_path, 2, crash, {}, keep_last=3)
    except KeyboardInterrupt:
        pass
    assert latest_checkpoint(tmp_path).name == "step_000001"
    assert read_state(latest_checkpoint(tmp_path))["version"] == 1
