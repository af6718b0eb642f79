import os
import shutil
import sys
from pathlib import Path

from harness.cluster import prepare_deepspeed


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
