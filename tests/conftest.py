from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.bench.synth import write_sample

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
BAD_DIR = Path(__file__).parent / "data" / "bad"


@pytest.fixture(scope="session")
def sample(tmp_path_factory) -> Path:
    """A small BehaviorBench-mini file shared by the tests."""
    return write_sample(tmp_path_factory.mktemp("mini"), tasks=400, seed=7)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the tests that need Ray (started on first use)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(sample, tmp_path_factory) -> Path:
    """The tiny Qwen2 with a tokenizer trained on the sample, saved like any Hugging Face model."""
    from harness.model import make_tiny

    return make_tiny(sample, tmp_path_factory.mktemp("models") / "tiny-qwen2")
