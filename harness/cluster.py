"""Ray start-up for training and sweeps, and what a worker must set before DeepSpeed is imported."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from harness.errors import ConfigError
from harness.store import is_uri

PROBE_TIMEOUT_S = 120


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


def _missing(paths: list[str]) -> list[str]:
    return [path for path in paths if not os.path.exists(path)]


def check_reachable(paths: dict[str, str | None]) -> None:
    """On a cluster of more than one node, refuse a local path that a node cannot see, before any worker or
    actor starts: storage, data and models must be storage URIs (`s3://...`) or on a file system every node
    mounts. Each path that exists here is looked up on every alive node by a zero-CPU task pinned to it (Ray
    Train checks its storage path the same way, but only once its workers run). `paths` maps config keys to
    paths; URIs, hub ids and None are skipped."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    local = {key: path for key, path in paths.items() if path and not is_uri(path) and os.path.exists(path)}
    nodes = [node for node in ray.nodes() if node["Alive"]]
    if len(nodes) < 2 or not local:
        return
    probe = ray.remote(num_cpus=0)(_missing)
    wanted = sorted(set(local.values()))
    lookups = []
    for node in nodes:
        pinned = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        lookups.append((node, probe.options(scheduling_strategy=pinned).remote(wanted)))
    for node, lookup in lookups:
        missing = ray.get(lookup, timeout=PROBE_TIMEOUT_S)
        if missing:
            key = next(key for key, path in local.items() if path == missing[0])
            where = f"{node['NodeManagerAddress']} (node {node['NodeID'][:8]})"
            raise ConfigError(
                f"{key}: {missing[0]}: not found on {where}, one of this cluster's {len(nodes)} nodes; use a storage "
                "URI (s3://...) or a path on a file system that every node mounts"
            )
