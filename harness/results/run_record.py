"""The full record of a run: library versions, hardware, batch sizes, seeds, and the git commit with a dirty flag."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import harness
from harness.core.storage import Location, location

PACKAGES = {  # record key: distribution name
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
    "deepspeed": "deepspeed",
    "ray": "ray",
    "harness": "behaviorbench-harness",
}
# Peak dense bf16 tensor-core FLOP/s of one GPU (NVIDIA datasheets: half the "with sparsity" figure), matched as a
# substring of the device name; more specific names come first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU by its name (`torch.cuda.get_device_name`); None when not in the table."""
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in device_name), None)


def versions() -> dict[str, str | None]:
    """Python's and each recorded package's version (None when not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for key, distribution in PACKAGES.items():
        try:
            found[key] = version(distribution)
        except PackageNotFoundError:
            found[key] = None
    return found


def hardware() -> dict[str, Any]:
    """This machine: host, platform, CPU count, total memory and the names of its GPUs."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(memory / 2**30, 1),
        "gpus": gpu_names(),
    }


def gpu_names() -> list[str]:
    """The GPUs this process sees, through torch where the process has imported it (a training worker); else the
    NVIDIA driver's list, so that a driver that never needed torch does not import it for this (2 s on a CPU)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    names = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        model = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines() if line.startswith("Model:")]
        names += model[:1]
    return names


def _git(*args: str) -> str | None:
    """The output of `git ARGS` in the harness checkout, or None outside one (or when git fails)."""
    try:
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, cwd=Path(harness.__file__).parent
        )
    except OSError:
        return None
    return done.stdout if done.returncode == 0 else None


def code_version() -> str:
    """The git commit of the harness checkout when there is one, else the package version."""
    sha = (_git("rev-parse", "--short", "HEAD") or "").strip()
    return sha or harness.__version__


def git_state() -> dict[str, Any]:
    """The harness checkout's commit (`code_version`) and whether its tracked files differ from it; outside a
    git checkout `commit` is the package version and `dirty` None."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": code_version(), "dirty": None if status is None else bool(status.strip())}


def run_record(batch: dict[str, int], seeds: dict[str, int]) -> dict[str, Any]:
    """What a run ran with: versions, hardware, `batch` sizes, `seeds` and the git state, with the time."""
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "hardware": hardware(),
        "batch": batch,
        "seeds": seeds,
        "git": git_state(),
    }


def save_record(path: Path | Location, record: dict[str, Any]) -> None:
    """Write `record` as JSON to `path`, a local file or an object (atomic either way)."""
    (path if isinstance(path, Location) else location(path, "run record")).write_text(
        json.dumps(record, indent=2) + "\n"
    )
