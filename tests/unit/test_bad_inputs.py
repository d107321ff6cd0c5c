"""The catalogue of bad input: each entry gives rlhub something a user plausibly gets wrong and asserts
the one line it answers with, naming the cause and the offending value, and that nothing is lost
(no half-written checkpoint, no run that cannot resume). The README's "Bad input, and failures that
show" table lists them with these tests' names.

The checks that stop `rlhub train` run before Ray starts, so most entries run the command itself in
this process with `ray.init` replaced by a failure (`no_ray`): a check that let the command through
fails its test instead of starting a run.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import socket

import pytest

from rlhub.checkpoint import (
    CheckpointError,
    CheckpointNotWritten,
    latest_checkpoint,
    list_checkpoints,
    resume_checkpoint,
    verify_checkpoint,
    write_checkpoint,
)
from rlhub.config import ConfigError, load_config

FN = "env.kwargs.fn=rlhub.envs.reward_fn:exact_match"


@pytest.fixture
def no_ray(monkeypatch):
    """Ray must not start: a check that does not stop the command fails the test instead of training."""
    import ray

    def started(*args, **kwargs):
        raise AssertionError("Ray was started: the check did not stop the command before it")

    monkeypatch.setattr(ray, "init", started)


@pytest.fixture
def says(capsys, no_ray, tmp_path):
    """`says(command, *args)`: `rlhub COMMAND ARGS run_dir=...` in this process; asserts it exits 2 (or
    `code`) with one line on stderr and no traceback, and returns that line."""
    from rlhub.cli import main

    def run(command: str, *args: str, code: int = 2) -> str:
        extra = [] if any(a.startswith("run_dir=") for a in args) else [f"run_dir={tmp_path / 'run'}"]
        assert main([command, *args, *extra]) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0], err
        return err[0]

    return run


@pytest.fixture
def rlhub_log():
    """The warnings rlhub logs meanwhile (its logger may not propagate to pytest's)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("rlhub")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


# ---- 1-3, 25: the config, before anything is loaded --------------------------------------------------

@pytest.mark.parametrize("args, line", [
    # 1. an unknown key: named with the nearest known one
    (["rollout.max_new_token=3"], "rollout.max_new_token: no such key; did you mean rollout.max_new_tokens?"),
    (["prompts_per_stepp=3"], "prompts_per_stepp: no such key; did you mean prompts_per_step?"),
    (["learner.lr=1e-3"], "learner.lr: no such key; did you mean algorithm.lr or warm_start.lr?"),
    (["algorithm=grpoo"], ["algorithm=grpoo: no such option (conf/algorithm/ has cispo, dapo, ", "); did you mean algorithm=grpo?"]),
    # 2. a value of the wrong type: the key, the value and the type it takes
    (["prompts_per_step=abc"], "prompts_per_step='abc': expected an integer"),
    (["algorithm.lr=fast"], "algorithm.lr='fast': expected a number"),
    (["resume=maybe"], "resume='maybe': expected true or false"),
    # 3. sizes that do not fit together
    (["group_size=1"], "group_size must be >= 2 (a group baseline needs two samples)"),
    (["learner.world_size=2", "learner.expert_parallel=3"], "learner.expert_parallel=3 must be >= 1 and divide learner.world_size=2"),
    (["rollout.max_model_len=4"], "rollout.max_model_len=4 leaves no room for a prompt beside rollout.max_new_tokens=4"),
    (["model.experts_per_token=9"], "model.experts_per_token=9 must be <= model.num_experts=8"),
    # 25. and the rest a user gets wrong
    (["max_staleness=-1"], "max_staleness must be >= 0"),
    (["cluster.learner_num_gpus=-1"], "cluster.learner_num_gpus=-1.0 must be >= 0"),
    (["wandb.mode=onlin"], "wandb.mode must be offline, online or disabled, not 'onlin'"),
    (["env=countdwn"], ["env.name='countdwn': no such environment (did you mean countdown?); installed: [", "'countdown'"]),
], ids=["misspelled key", "misspelled top-level key", "key in another section", "unknown preset", "text for an integer",
        "text for a number", "text for a bool", "group of one", "expert_parallel not dividing world_size",
        "no room for a prompt", "more experts per token than experts", "negative staleness", "negative GPUs",
        "unknown wandb mode", "unknown environment"])
def test_a_bad_config_value(says, args, line):
    said = says("config", *args)
    assert said.startswith("rlhub: config error: ") and all(part in said for part in ([line] if isinstance(line, str) else line)), said


# ---- 4-6: the model directory ----------------------------------------------------------------------

@pytest.fixture
def model_copy(tiny_model_path, tmp_path):
    return shutil.copytree(tiny_model_path, tmp_path / "model")


def test_a_missing_model_directory(says):
    assert says("train", "model.path=/nonexistent/model") == (
        "rlhub: model.path='/nonexistent/model': no Hugging Face model directory there (config.json missing)")


def test_a_model_config_that_is_not_json(says, model_copy):
    (model_copy / "config.json").write_text('{"vocab_size": 259,')
    assert f"model.path='{model_copy}': config.json is not JSON (" in says("train", f"model.path={model_copy}")


def test_truncated_model_weights(says, model_copy):
    weights = model_copy / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as f:
        f.truncate(size // 2)
    assert f"model.safetensors: {size // 2} bytes, but its header says {size} (truncated)" in says("train", f"model.path={model_copy}")


def test_a_tokenizer_beyond_the_model_vocabulary(says, model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps({**config, "vocab_size": 200}))
    assert "the tokenizer has ids up to 258 but the model's vocab_size is 200" in says("train", f"model.path={model_copy}")


# ---- 7-10: the data and the prompts ------------------------------------------------------------------

def test_a_dataset_that_does_not_exist(says):
    said = says("train", "env=reward_fn", FN, "env.dataset.path=/nonexistent/rows.jsonl")
    assert "env.dataset.path='/nonexistent/rows.jsonl': no such file or directory" in said


def test_an_empty_dataset(says, tmp_path):
    (tmp_path / "rows.jsonl").write_text("")
    assert f"env.dataset.path='{tmp_path}/rows.jsonl': split 'train' is empty" in says(
        "train", "env=reward_fn", FN, f"env.dataset.path={tmp_path}/rows.jsonl")


def test_a_dataset_without_the_column_the_environment_reads(says, tmp_path):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n")
    said = says("train", "env=reward_fn", FN, f"env.dataset.path={tmp_path}/rows.jsonl")
    assert "lacks column(s) ['prompt'] that the environment reads; its columns: ['question', 'answer']" in said
    assert "env.dataset.columns.prompt=COLUMN" in said


def test_prompts_longer_than_the_model_length(says):
    said = says("train", "rollout.max_model_len=8")
    assert "env.name='arithmetic': rollout.max_model_len=8 leaves 4 prompt tokens after rollout.max_new_tokens=4" in said
    assert "0 of 64 sampled prompts fit" in said and "set rollout.max_model_len=" in said


# ---- 11-13: an environment that fails during the run: the group is dropped and counted, the run goes on ----

class Faulty:
    """Arithmetic, going wrong (`how`) on the rows whose prompt starts with "max(0,": a reset that raises,
    a NaN reward, a reward that is a string."""

    def __init__(self, how: str) -> None:
        from rlhub.envs import make_env

        self.env, self.how = make_env("arithmetic"), how

    def dataset(self, split):
        return self.env.dataset(split)

    def reset(self, row):
        bad = row["prompt"].startswith("max(0,")
        if bad and self.how == "reset":
            raise ZeroDivisionError("a broken row")
        prompt, state = self.env.reset(row)
        return prompt, (bad, state)

    def step(self, state, message):
        from rlhub.envs.base import StepResult

        bad, state = state
        if bad and self.how == "nan":
            return StepResult(float("nan"))
        if bad and self.how == "text":
            return StepResult("1.0")
        return self.env.step(state, message)


@pytest.mark.parametrize("how, reason, error", [
    ("reset", "env_error", "ZeroDivisionError"),  # 11
    ("nan", "nonfinite_reward", "ValueError"),  # 12
    ("text", "bad_reward", "BadReward"),  # 13
], ids=["reset raises", "NaN reward", "text reward"])
def test_an_environment_that_fails_loses_its_groups_only(tiny_model_path, tokenizer, how, reason, error):
    from rlhub.datastore import InMemoryDataStore, prompt_index
    from rlhub.engines.hf import HFEngine
    from rlhub.rollout import DataSide, RolloutConfig, RolloutWorker
    from rlhub.weight_sync import InMemoryWeightSync, probe_sequence

    env = Faulty(how)
    rows = env.dataset("train")
    groups = list(range(12))
    bad = [g for g in groups if rows[prompt_index(g, len(rows), 0)]["prompt"].startswith("max(0,")]
    assert 0 < len(bad) < len(groups)
    store = InMemoryDataStore(prompts_per_step=len(groups), max_staleness=0)
    worker = RolloutWorker(0, RolloutConfig(max_new_tokens=2, max_model_len=64), 4, 8, HFEngine(tiny_model_path, seed=0), env,
                           tokenizer, store, InMemoryWeightSync(), DataSide(), probe_sequence(259), env_name="faulty")
    worker.generate_groups(groups)
    stats = store.stats()
    assert stats["dropped"] == {reason: len(bad)}  # each failed group dropped, with its reason
    assert stats["queued"] == len(groups) - len(bad)  # the others are in the store for the learner
    assert worker.stats.env_errors[error] == len(bad) * (1 if how == "reset" else 4)
    report = worker.stats.failure_reports[0]
    assert report["env"] == "faulty" and report["error"] == error and "max(0," in report["row"]


# ---- 14: a plugin that does not import ---------------------------------------------------------------

def test_an_environment_plugin_that_does_not_import(says, tmp_path, monkeypatch):
    from importlib.metadata import EntryPoint

    from rlhub.envs import registry

    (tmp_path / "broken_env_plugin.py").write_text("import a_dependency_not_installed\n\ndef load_environment():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    installed = registry.available_envs()
    broken = EntryPoint(name="broken", value="broken_env_plugin:load_environment", group=registry.GROUP)
    monkeypatch.setattr(registry, "available_envs", lambda: {**installed, "broken": broken})
    assert says("config", "env=broken") == ("rlhub: config error: env.name='broken': its entry point 'broken_env_plugin:load_environment' "
                                            "does not import: ModuleNotFoundError: No module named 'a_dependency_not_installed'")


# ---- 15-18: checkpoints: damaged, of another model, not written ---------------------------------------

@pytest.fixture
def run_dir(tmp_path, tiny_model_path):
    """A run with checkpoints at steps 5 and 10, as the learner writes them (policy/ an HF directory)."""
    def tensors(d):
        (d / "policy").mkdir()
        shutil.copy(f"{tiny_model_path}/config.json", d / "policy" / "config.json")
        (d / "policy" / "model.safetensors").write_bytes(bytes(range(256)) * 64)
        (d / "learner").mkdir()
        (d / "learner" / "__0_0.distcp").write_bytes(b"optimizer state" * 100)

    for step in (5, 10):
        write_checkpoint(tmp_path / "run", step, tensors, {"store": {}}, keep_last=3)
    return tmp_path / "run"


def model_config(tiny_model_path):
    return json.loads(open(f"{tiny_model_path}/config.json").read())


def test_checkpoints_list_every_file_and_the_model_and_verify(run_dir, tiny_model_path):
    manifest = json.loads((run_dir / "checkpoints/step_000010/manifest.json").read_text())
    assert sorted(manifest["files"]) == ["learner/__0_0.distcp", "policy/config.json", "policy/model.safetensors", "state.json"]
    assert manifest["model"] == {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 259, "hidden_size": 128, "num_hidden_layers": 2,
                                 "num_experts": 8}
    verify_checkpoint(run_dir / "checkpoints/step_000010", model_config(tiny_model_path))
    assert resume_checkpoint(run_dir, tiny_model_path).name == "step_000010"


@pytest.mark.parametrize("damage, cause", [
    (lambda f: f.write_bytes(b"X" + f.read_bytes()[1:]), "learner/__0_0.distcp: sha256 mismatch (corrupt)"),  # 15
    (lambda f: f.write_bytes(f.read_bytes()[:100]), "learner/__0_0.distcp: 100 bytes, written as 1500 (truncated)"),  # 16
    (lambda f: f.unlink(), "learner/__0_0.distcp: missing"),
], ids=["corrupt", "truncated", "missing"])
def test_a_damaged_checkpoint_is_named_and_the_newest_intact_one_resumes(run_dir, tiny_model_path, rlhub_log, damage, cause):
    newest = run_dir / "checkpoints/step_000010"
    damage(newest / "learner/__0_0.distcp")
    with pytest.raises(CheckpointError, match="sha256|bytes|missing") as e:
        verify_checkpoint(newest)
    assert str(e.value) == f"checkpoint {newest}: {cause}" and e.value.damaged
    assert resume_checkpoint(run_dir, tiny_model_path).name == "step_000005"  # the newest that verifies
    warned = f"checkpoint {newest}: {cause}; resuming from step_000005, the newest checkpoint that verifies (moved aside: damaged-step_000010)"
    assert [r.getMessage() for r in rlhub_log] == [warned]
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_000005"] and (run_dir / "checkpoints/damaged-step_000010").is_dir()
    damage(run_dir / "checkpoints/step_000005/learner/__0_0.distcp")  # and when none verifies: refused, in one line
    with pytest.raises(CheckpointError, match=re.escape(f"step_000005: {cause}; no checkpoint of {run_dir} verifies")) as e:
        resume_checkpoint(run_dir, tiny_model_path)
    assert "\n" not in str(e.value)


def test_eval_and_export_read_the_newest_checkpoint_that_verifies_and_refuse_a_damaged_one_by_name(run_dir, rlhub_log, says, capsys):
    from rlhub.checkpoint import readable_checkpoint
    from rlhub.cli import main
    from rlhub.export import find_policy, verified

    newest, older = run_dir / "checkpoints/step_000010", run_dir / "checkpoints/step_000005"
    (run_dir / "config.yaml").write_text("seed: 1\n")
    assert readable_checkpoint(run_dir) == newest and not rlhub_log
    (newest / "policy/model.safetensors").write_bytes(b"\0" * (64 * 256))  # same size, other bytes
    cause = f"checkpoint {newest}: policy/model.safetensors: sha256 mismatch (corrupt)"
    assert find_policy(verified(run_dir)) == older / "policy"  # a run directory: the newest that verifies, named and left in place
    assert [r.getMessage() for r in rlhub_log] == [f"{cause}; reading step_000005, the newest checkpoint that verifies"]
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_000005", "step_000010"]
    for named in (newest, newest / "policy"):  # named: refused
        with pytest.raises(CheckpointError, match=re.escape(cause)):
            verified(named)
    assert main(["export", str(newest), "--out", str(run_dir / "out")]) == 2 and capsys.readouterr().err == f"rlhub: {cause}\n"
    assert says("eval", str(newest)) == f"rlhub: {cause}"
    (older / "state.json").write_text("{}")
    assert says("eval", str(run_dir)) == (f"rlhub: {cause}; no checkpoint of {run_dir} verifies")


def test_a_checkpoint_of_another_model_is_refused(run_dir, tiny_model_path, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**model_config(tiny_model_path), "hidden_size": 576, "vocab_size": 49152}))
    with pytest.raises(CheckpointError) as e:  # 17: no older checkpoint would fit either: nothing is moved
        resume_checkpoint(run_dir, other)
    assert str(e.value) == (f"checkpoint {run_dir}/checkpoints/step_000010 is of another model: vocab_size=259, hidden_size=128; "
                            "this run's model has vocab_size=49152, hidden_size=576 (model.path, or a new run_dir)")
    assert not e.value.damaged and len(list_checkpoints(run_dir)) == 2


def test_a_full_disk_while_checkpointing_leaves_the_last_checkpoint(run_dir, tiny_model_path, says, monkeypatch):
    def full(d):  # 18: the tensor writer runs out of space halfway
        (d / "learner").mkdir()
        (d / "learner" / "__0_0.distcp").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(d / "learner" / "__0_0.distcp"))

    with pytest.raises(CheckpointNotWritten) as e:
        write_checkpoint(run_dir, 15, full, {"store": {}}, keep_last=3)
    root = run_dir / "checkpoints"
    assert str(e.value) == (f"checkpoint {root}/step_000015 not written: no space left on device ({root}/.step_000015.tmp/learner/"
                            "__0_0.distcp); the last checkpoint, step_000010, is intact")
    assert sorted(p.name for p in root.iterdir()) == ["step_000005", "step_000010"]  # no temporary directory left
    assert latest_checkpoint(run_dir).name == "step_000010" and resume_checkpoint(run_dir, tiny_model_path).name == "step_000010"
    from rlhub.actors import (
        controller,  # the command stops with that line (exit 1: the run failed)
    )

    def train(cfg):
        raise e.value

    monkeypatch.setattr(controller, "train", train)
    assert says("train", code=1) == f"rlhub: {e.value}"


# ---- 19-24: where the run goes and what it runs on ----------------------------------------------------

def test_a_run_directory_that_cannot_be_written(says, tmp_path):
    said = says("train", "run_dir=/proc/rlhub-run")  # 19: not even root may make a directory there
    assert said == ("rlhub: config error: run_dir='/proc/rlhub-run': cannot make or write a directory there "
                    "(No such file or directory: /proc/rlhub-run)")
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    said = says("train", f"run_dir={blocked}/run")
    assert said.endswith(f"run_dir='{blocked}/run': cannot make or write a directory there (Not a directory: {blocked}/run)")
    assert says("train", f"run_dir={blocked}").endswith(f"run_dir='{blocked}': {blocked} is a file, not a directory")


def test_wandb_online_without_credentials_logs_offline_with_one_warning(tmp_path, monkeypatch, rlhub_log):
    import wandb

    from rlhub.tracking import Tracker

    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    modes = []

    class Run:
        id = "r1"

    monkeypatch.setattr(wandb, "init", lambda **kw: modes.append(kw["mode"]) or Run())  # no network, whatever happens
    cfg = load_config(["wandb.mode=online", "progress=false"])
    Tracker(tmp_path, cfg, 10, 0).metrics_file.close()  # 20
    assert modes == ["offline"] and len(rlhub_log) == 1
    assert rlhub_log[0].getMessage().startswith("wandb.mode=online but no W&B credentials (WANDB_API_KEY or `wandb login`): "
                                                "logging offline instead")
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password k3y\n")
    Tracker(tmp_path, cfg, 10, 0).metrics_file.close()
    assert modes == ["offline", "online"] and len(rlhub_log) == 1


def test_a_rendezvous_port_in_use(tmp_path):
    from rlhub.parallel.ranks import PortInUse, join

    with socket.socket() as taken:  # 21: rank 0's port, taken between choosing it and listening on it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse) as e:
            join("127.0.0.1", port, 0, 2, timeout_s=5)
    assert str(e.value) == (f"learner rank 0 cannot listen at 127.0.0.1:{port} for the ranks' rendezvous: the port is in use "
                            "(EADDRINUSE; another process took it after it was chosen; start the run again)")


def test_a_cluster_address_where_nothing_answers(says):
    assert says("train", "cluster.address=127.0.0.1:1").startswith(  # 22
        "rlhub: config error: cluster.address='127.0.0.1:1': nothing answers at 127.0.0.1:1 (")


def test_a_cluster_too_small_for_the_actors(monkeypatch):
    import ray
    from rlhub.actors.cluster import check_placement

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})  # 23: what a joined cluster has
    with pytest.raises(ConfigError) as e:
        check_placement(load_config(["rollout.num_actors=4", "cluster.learner_num_gpus=1"]))
    assert str(e.value) == ("the cluster cannot place the learner and 4 rollout actors: 5 CPU needed, 2 in the cluster, 1 GPU needed, "
                            "0 in the cluster (rollout.num_actors, cluster.rollout_num_cpus, cluster.learner_num_cpus)")


def test_a_gpu_asked_for_on_a_machine_without_one(says, monkeypatch):
    from rlhub.actors import cluster

    monkeypatch.setattr(cluster, "local_gpus", lambda: 0)  # 24: this machine, as Ray would find it
    assert says("train", "cluster.learner_num_gpus=1", "cluster.rollout_num_gpus=0.5") == (
        "rlhub: config error: cluster.learner_num_gpus=1, cluster.rollout_num_gpus=0.5: the run's actors need 1.5 GPU(s) and this "
        "machine has 0 (set them to 0 to run on CPUs, or cluster.address to join a cluster with GPUs)")


# ---- 25+: more of what a user gets wrong -------------------------------------------------------------

def test_a_judge_template_with_an_unknown_field(says):
    assert says("train", "reward.judge.template='Is {completion} right for {question}?'") == (
        "rlhub: config error: reward.judge.template: KeyError 'question'; it may use {prompt}, {completion} and {answer}")


def test_an_environment_argument_its_factory_does_not_take(says):
    said = says("train", "env.kwargs.max_operands=4")
    assert said.startswith("rlhub: config error: env.name='arithmetic' with env.kwargs={'max_operands': 4}: ")
    assert "unexpected keyword argument 'max_operands'" in said


def test_resume_without_a_checkpoint(says, tmp_path):
    assert says("train", "resume=true", f"run_dir={tmp_path}") == f"rlhub: config error: resume=true: {tmp_path} holds no checkpoint"
