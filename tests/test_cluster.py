import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.train.recipe import prepare_deepspeed


def test_a_worker_builds_deepspeed_ops_with_this_environments_ninja(monkeypatch):
    """Whatever PATH a worker inherits (a job's, a local shell's, one without ninja), DeepSpeed's JIT ops are built
    with the ninja installed beside this interpreter, so their build cache stays valid across them."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    prepare_deepspeed(use_gpu=False)
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    assert Path(shutil.which("ninja")).parent == Path(sys.executable).parent
    prepare_deepspeed(use_gpu=False)  # a second call (a restarted worker's) adds nothing
    assert os.environ["PATH"].split(os.pathsep) == [str(Path(sys.executable).parent), "/usr/bin", "/bin"]


def _harness(cwd: Path, *args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    began = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "harness.cli", *args],
        cwd=cwd,
        env={**os.environ, "HARNESS_CONNECT_TIMEOUT_S": "2", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return run, time.perf_counter() - began


@pytest.mark.parametrize(
    ("how", "address", "problem"),
    [
        ("RAY_ADDRESS", "127.0.0.1:1", "nothing answers there (Connection refused)"),
        ("--address", "127.0.0.1:1", "nothing answers there (Connection refused)"),
        ("address=", "127.0.0.1:1", "nothing answers there (Connection refused)"),
        ("RAY_ADDRESS", "ray://127.0.0.1:1", "nothing answers there within 2 s"),
    ],
)
def test_a_dead_cluster_address_fails_fast_with_one_line(tiny_model, tmp_path, how, address, problem):
    """`ray.init` would wait minutes for a cluster that is not there; the harness asks first, for 2 seconds here."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    args = ["train", f"model.name_or_path={tiny_model}", f"storage_path={tmp_path / 'runs'}"]
    env = {"RAY_ADDRESS": address} if how == "RAY_ADDRESS" else {}
    args += {"--address": ["--address", address], "address=": [f"address={address}"]}.get(how, [])
    run, took = _harness(cwd, *args, env=env)
    source = "RAY_ADDRESS" if how == "RAY_ADDRESS" else "address"
    assert (run.returncode, run.stderr) == (
        1,
        f"error: {source} {address}: no Ray cluster: {problem}; start one with `ray start --head`, give the address "
        "of a running one, or unset RAY_ADDRESS to start a local cluster (waited 2 s; $HARNESS_CONNECT_TIMEOUT_S sets "
        "how long)\n",
    )
    assert took < 30  # the Python start and imports included
    assert not (tmp_path / "runs").exists() and list(cwd.iterdir()) == []  # the log goes to $HARNESS_LOG_DIR


def test_a_dashboard_address_is_named_as_one(tiny_model, tmp_path):
    run, _ = _harness(tmp_path, "train", f"model.name_or_path={tiny_model}", env={"RAY_ADDRESS": "http://h:8265"})
    assert run.returncode == 1
    assert run.stderr.startswith("error: RAY_ADDRESS http://h:8265: that is a dashboard (job API) address")
