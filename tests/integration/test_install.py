"""rlhub installed as a package (a wheel), not as a checkout: configs, benchmarks and data come with it.

The wheel is built from the repository and installed into a fresh virtual environment whose only
other packages are this environment's dependencies (one path line in a .pth file: the editable
install's own finder is not loaded there, so nothing can fall back to the checkout). Then
`rlhub envs list` and a 2-step `rlhub train` run from a directory outside the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the bin/ of a fresh venv it is installed in)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # the tracked files, as a clone or a git URL has them (the build writes into its source)
    for name in subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True).stdout.splitlines():
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(src)],
                   check=True, cwd=tmp, capture_output=True)
    wheel = next((tmp / "dist").glob("rlhub-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                             capture_output=True, text=True).stdout.strip()
    Path(purelib, "rlhub_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # the dependencies, not their .pth files
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)], check=True,
                   capture_output=True)
    return wheel, venv / "bin"


def run(bin_dir: Path, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_holds_the_configs_the_benchmarks_and_the_data(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for conf in (ROOT / "conf").rglob("*.yaml"):
        assert f"rlhub/conf/{conf.relative_to(ROOT / 'conf').as_posix()}" in names
    for module in (ROOT / "rlhub" / "benches").glob("*.py"):
        assert f"rlhub/benches/{module.name}" in names
    for data in (ROOT / "envs" / "data").glob("*.jsonl"):
        assert f"rlhub/envs/data/{data.name}" in names


def test_an_installed_rlhub_lists_environments_and_trains_outside_the_checkout(installed, tmp_path):
    _, bin_dir = installed
    where = run(bin_dir, "python", "-c", "import rlhub, rlhub.config as c; print(rlhub.__file__); print(c.CONF_DIR)", cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    module, conf = where.stdout.split()
    assert str(bin_dir.parent) in module and str(bin_dir.parent) in conf and not conf.startswith(str(ROOT))
    listed = run(bin_dir, "rlhub", "envs", "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "arithmetic" in listed.stdout and "calculator_tools" in listed.stdout
    trained = run(bin_dir, "rlhub", "train", "experiment.total_steps=2", cwd=tmp_path, timeout=600)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    metrics = list(tmp_path.rglob("metrics.jsonl"))
    assert len(metrics) == 1 and len(metrics[0].read_text().splitlines()) >= 2  # both steps, in a run directory under cwd
