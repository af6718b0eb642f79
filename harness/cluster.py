"""Ray start-up for training and sweeps, and the DeepSpeed accelerator that CPU workers must be told."""

from __future__ import annotations

import os


def init_ray(use_gpu: bool) -> None:
    """Join the cluster (or start a local one) unless connected; CPU workers get DeepSpeed's CPU accelerator."""
    import ray

    if not ray.is_initialized():
        ray.init(runtime_env=None if use_gpu else {"env_vars": {"DS_ACCELERATOR": "cpu"}})


def sync_accelerator(use_gpu: bool) -> None:
    """In a worker, before DeepSpeed is imported: DeepSpeed picks its accelerator at import time."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
