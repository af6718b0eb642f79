"""Ray start-up for training and sweeps, and what a worker must set before DeepSpeed is imported."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def init_ray(use_gpu: bool) -> None:
    """Join the cluster (or start a local one) unless connected; CPU workers get DeepSpeed's CPU accelerator."""
    import ray

    if not ray.is_initialized():
        ray.init(runtime_env=None if use_gpu else {"env_vars": {"DS_ACCELERATOR": "cpu"}})


def prepare_deepspeed(use_gpu: bool) -> None:
    """In a worker, before DeepSpeed is imported: its accelerator (picked at import time) and the toolchain of its
    JIT-built ops.

    The ops are built by the first `ninja` on PATH into `~/.cache/torch_extensions`. A job's workers and a local
    run's may find different ninja versions (this environment's, installed with DeepSpeed, or the system's), whose
    build logs disagree, so each switch rebuilt the op (about a minute on 2 CPUs); without a system ninja and an
    activated environment the build failed. The interpreter's own bin directory comes first, as activation does.
    """
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir
