"""Nothing let in: what a run writes is data only, no secret leaves it, and nothing it starts listens beyond loopback.

1. Checkpoints (full learner and LoRA) and exports hold safetensors, JSON and
   text only, and resuming from them unpickles nothing (`pickle` and
   `torch.load` made to raise). A checkpoint of the earlier formats (DCP's
   pickled `.metadata`, LoRA's `optimizer.pt`) still loads, and a crafted one
   that would run code is refused.
2. A secret in the environment reaches neither the run directory (logs,
   `config.yaml`, the offline W&B run, its config and metadata) nor the
   terminal, not even when the command line or the config carries it
   (`rlhub.redact`).
3. A local run's Ray (GCS, raylet, workers, agents) and its learner ranks'
   rendezvous (torch's store, gloo's sockets) listen on loopback only
   (`cluster.bind_host`); with `cluster.bind_host=0.0.0.0` they do not, which
   shows the test sees what it checks.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from rlhub.algorithms.config import AlgorithmConfig
from rlhub.models.config import LoraConfig, ModelConfig
from rlhub.moe import MoEConfig

DATA_SUFFIXES = {".safetensors", ".json", ".jinja", ".md", ".txt"}
"""What a checkpoint or an export may hold: tensors in safetensors, the rest JSON or plain text (a chat
template, a README, a merges list); nothing that is unpickled."""


@pytest.fixture(autouse=True)
def calls_dir():
    """The sandbox probes' fixture of this folder does not apply here (nothing runs in the sandbox)."""
    yield None


# ---- 1. checkpoints and exports: data only ---------------------------------------------------------

def make_learner(path: str, lora_rank: int = 0):
    from rlhub.learner import Learner
    from rlhub.weight_sync import probe_sequence

    model = ModelConfig(lora=LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank, targets=["attention", "experts"])) if lora_rank else ModelConfig()
    return Learner(path, model, AlgorithmConfig(lr=1e-2, micro_batch_size=4), probe_sequence(259),
                   moe=MoEConfig(routing_replay="rollout"), replay=True)


def one_batch(path: str):
    from rlhub.benches.learner import Workload, make_batches, model_info
    from rlhub.types import collate

    info = model_info(Path(path), "float32")
    return collate(make_batches(info, Workload(2, 4, (6, 10), (4, 8), 4, warmup=0, steps=1), 3)[0], info.pad_id)


def trained_state(learner) -> dict[str, torch.Tensor]:
    """Parameters and optimizer tensors by name, copied."""
    out = {f"param/{n}": p.detach().clone() for n, p in learner.model.named_parameters() if p.requires_grad}
    names = {id(p): n for n, p in learner.model.named_parameters()}
    for p, values in learner.optimizer.state.items():
        out.update({f"optim/{names[id(p)]}/{k}": v.clone() for k, v in values.items() if torch.is_tensor(v)})
    return out


def forbid_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way the stack could unpickle a file raises: pickle's loaders and torch.load."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a checkpoint was unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)


def written_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_checkpoints_and_exports_hold_only_data_and_resume_without_unpickling(tiny_model_path, tmp_path, monkeypatch):
    from rlhub.checkpoint import write_checkpoint
    from rlhub.export import export

    checkpoints, saved = {}, {}
    for kind, rank in (("full", 0), ("lora", 4)):
        learner = make_learner(tiny_model_path, rank)
        learner.train_step(one_batch(tiny_model_path))
        saved[kind] = trained_state(learner)
        checkpoints[kind] = write_checkpoint(tmp_path / kind, 1, learner.save, {}, keep_last=1)
        export(checkpoints[kind], tmp_path / f"export-{kind}")
    assert (checkpoints["full"] / "learner" / "index.json").is_file() and (checkpoints["lora"] / "adapters" / "optimizer.json").is_file()
    files = written_files(tmp_path)
    assert any(f.suffix == ".safetensors" for f in files) and len(files) >= 12
    assert [str(f.relative_to(tmp_path)) for f in files if f.suffix not in DATA_SUFFIXES] == []

    forbid_unpickling(monkeypatch)
    for kind, rank in (("full", 0), ("lora", 4)):
        resumed = make_learner(tiny_model_path, rank)
        resumed.load(checkpoints[kind], 1)
        state = trained_state(resumed)
        assert state.keys() == saved[kind].keys() and any(k.startswith("optim/") for k in state)
        for name, value in saved[kind].items():
            torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)
        assert isinstance(resumed.optimizer.param_groups[0]["betas"], tuple)  # a tuple again (JSON has lists), as AdamW made it


def test_checkpoints_of_the_earlier_formats_still_load(tiny_model_path, tmp_path):
    import torch.distributed.checkpoint as dcp

    from rlhub import lora
    from rlhub.parallel.checkpoint import DIRNAME, _states

    full = make_learner(tiny_model_path)
    full.train_step(one_batch(tiny_model_path))
    state, _ = _states(full.model, full.optimizer, None, full.layout)
    dcp.save(state, checkpoint_id=str(tmp_path / "full" / DIRNAME), no_dist=True)  # DCP's default format: .metadata, .distcp
    adapted = make_learner(tiny_model_path, 4)
    adapted.train_step(one_batch(tiny_model_path))
    lora.save(tmp_path / "lora", adapted.model, adapted.lora, adapted.optimizer, tiny_model_path)
    target = tmp_path / "lora" / lora.ADAPTERS_DIR
    for f in (lora.OPTIMIZER_FILE, lora.OPTIMIZER_META):
        (target / f).unlink()
    torch.save(adapted.optimizer.state_dict(), target / lora.LEGACY_OPTIMIZER)
    for old, kind, rank in ((full, "full", 0), (adapted, "lora", 4)):
        resumed = make_learner(tiny_model_path, rank)
        resumed.load(tmp_path / kind, 1)
        for name, value in trained_state(old).items():
            torch.testing.assert_close(trained_state(resumed)[name], value, rtol=0, atol=0, msg=name)


class RunsCode:
    """Unpickling this object would create `marker` (a stand-in for any code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_of_the_earlier_formats_is_refused(tiny_model_path, tmp_path):
    from rlhub import lora
    from rlhub.parallel.checkpoint import DIRNAME, saved_keys

    marker = tmp_path / "ran"
    (tmp_path / "ckpt" / DIRNAME).mkdir(parents=True)
    (tmp_path / "ckpt" / DIRNAME / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(pickle.UnpicklingError, match="may not name"):
        saved_keys(tmp_path / "ckpt")
    adapters = tmp_path / "lora" / lora.ADAPTERS_DIR
    adapters.mkdir(parents=True)
    torch.save({"state": {}, "param_groups": [], "x": RunsCode(marker)}, adapters / lora.LEGACY_OPTIMIZER)
    with pytest.raises(pickle.UnpicklingError):
        lora.read_optimizer(adapters, torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]))
    assert not marker.exists()


# ---- 2. no secret leaves the run ---------------------------------------------------------------------

def test_no_secret_reaches_the_run_directory_the_wandb_run_or_the_terminal(tmp_path):
    wandb_key, hf_token = f"wandbkey{secrets.token_hex(12)}", f"hftoken{secrets.token_hex(12)}"
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_API_KEY": wandb_key, "HF_TOKEN": hf_token, "WANDB_MODE": "offline", "RAY_ADDRESS": ""}
    # the config brings one secret in from the environment, the command line carries the other as it is
    args = [sys.executable, "-m", "rlhub.cli", "train", "experiment.total_steps=2", "prompts_per_step=4", "group_size=4",
            "warm_start.steps=0", "wandb.mode=offline", "progress=false", f"run_dir={run_dir}",
            f"wandb.tags=[run-${{oc.env:WANDB_API_KEY}},{hf_token}]"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run_dir / "config.yaml").is_file() and list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert "<redacted>" in (run_dir / "config.yaml").read_text()  # the secret was there to be redacted
    leaks = [str(f.relative_to(run_dir)) for f in written_files(run_dir)
             if any(s.encode() in f.read_bytes() for s in (wandb_key, hf_token))]
    assert leaks == []
    assert wandb_key not in out.stdout + out.stderr and hf_token not in out.stdout + out.stderr


def test_rlhub_log_handlers_redact_secrets(tmp_path, monkeypatch, capsys):
    from rlhub.actors.controller import _setup_logging

    token = f"svc{secrets.token_hex(12)}"
    monkeypatch.setenv("SERVICE_API_KEY", token)
    log = logging.getLogger("rlhub")
    kept, level, propagate = list(log.handlers), log.level, log.propagate
    _setup_logging(tmp_path)
    try:
        log.warning("calling the service with %s", token)
        try:
            raise RuntimeError(f"the service refused {token}")
        except RuntimeError:
            log.exception("env error")
    finally:
        for h in [h for h in log.handlers if h not in kept]:
            log.removeHandler(h)
            h.close()
        log.setLevel(level)
        log.propagate = propagate
    written = (tmp_path / "train.log").read_text()
    assert token not in written and written.count("<redacted>") == 2  # the message and the traceback
    terminal = capsys.readouterr().err
    assert "calling the service with <redacted>" in terminal and token not in terminal


# ---- 3. every server on loopback -----------------------------------------------------------------------

def listening_sockets() -> list[dict[str, Any]]:
    """The TCP sockets this process and its descendants (Ray's processes, the actors) listen on."""
    import psutil

    me = psutil.Process()
    pids = {me.pid, *(p.pid for p in me.children(recursive=True))}
    out = []
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            try:
                name = " ".join(psutil.Process(c.pid).cmdline())[:120]
            except psutil.Error:
                name = "?"
            out.append({"ip": c.laddr.ip, "port": c.laddr.port, "process": name})
    return out


def probe_listeners(bind_host: str, model_path: str) -> None:
    """Run as a script (a fresh process: Ray reads its settings when imported): start a local Ray as
    `rlhub train` does, join two learner ranks as the controller does, print every listening socket."""
    import ray
    from rlhub.actors.cluster import forget_local_ray, init_ray, plan_cores
    from rlhub.actors.learner import LearnerGroup

    from rlhub.config import load_config
    from rlhub.weight_sync import probe_sequence

    cfg = load_config([f"cluster.bind_host={bind_host}", "learner.world_size=2", "cluster.learner_num_cpus=0.5",
                       "rollout.pin_cores=false"])
    init_ray(cfg, plan_cores(cfg))
    try:
        group = LearnerGroup(cfg, model_path, probe_sequence(259), None)
        group.start()
        import time

        time.sleep(2)  # Ray's agents come up beside the workers
        print(json.dumps({"where": group.where, "sockets": listening_sockets()}))
        group.close()
    finally:
        ray.shutdown()
        forget_local_ray()


def listeners(bind_host: str, model_path: str) -> dict[str, Any]:
    env = {**os.environ, "RAY_ADDRESS": ""}
    out = subprocess.run([sys.executable, __file__, bind_host, model_path], capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def is_loopback(ip: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(ip)
    return address.is_loopback or (address.version == 6 and address.ipv4_mapped is not None and address.ipv4_mapped.is_loopback)


FOREIGN_RAY = "import ray, sys, time; ray.init(address='local', num_cpus=1, include_dashboard=False); print('up', flush=True); time.sleep(600)"


@pytest.fixture(scope="module")
def foreign_ray():
    """Another Ray running on the machine (another user's, another run's): a local run must not join it."""
    proc = subprocess.Popen([sys.executable, "-c", FOREIGN_RAY], stdout=subprocess.PIPE, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.stdout.readline().strip() == "up"
    yield proc.pid
    proc.terminate()  # its driver's SIGTERM handler shuts its Ray down
    proc.wait(timeout=60)


@pytest.mark.parametrize("bind_host", ["127.0.0.1", "0.0.0.0"])
def test_a_local_runs_ray_and_learner_ranks_listen_on_loopback_only(tiny_model_path, foreign_ray, bind_host):
    found = listeners(bind_host, tiny_model_path)
    sockets = found["sockets"]
    processes = " ".join(s["process"] for s in sockets)
    # the run's own Ray (not the foreign one: its GCS would not be the run's child) and the servers it started
    assert "gcs_server" in processes and "raylet" in processes and "LearnerActor" in processes, sockets
    outside = [s for s in sockets if not is_loopback(s["ip"])]
    if bind_host == "127.0.0.1":
        assert outside == [], outside
        assert {w["node"] for w in found["where"]} == {"127.0.0.1"}  # the ranks' rendezvous address
    else:  # Ray's defaults: the same scan finds servers open beyond this machine
        assert outside


if __name__ == "__main__":
    probe_listeners(sys.argv[1], sys.argv[2])
