from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.data.mini import write_sample

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
BAD_DIR = Path(__file__).parent / "data" / "bad"
SLOW_TEST_TIMEOUT = 900  # seconds; the slowest end-to-end test took about 6 minutes alone on 2 cores


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT))


@pytest.fixture(scope="session", autouse=True)
def _log_dir(tmp_path_factory) -> None:
    """The CLI log files of the suite's commands go to a directory of the session, not the repository's
    artifacts/logs (a test of the default location removes the variable)."""
    os.environ.setdefault("HARNESS_LOG_DIR", str(tmp_path_factory.mktemp("logs")))


@pytest.fixture(scope="session")
def sample(tmp_path_factory) -> Path:
    """A small BehaviorBench-mini file shared by the tests."""
    return write_sample(tmp_path_factory.mktemp("mini"), tasks=400, seed=7)


@pytest.fixture(scope="session")
def _ray_shutdown_at_end():
    import ray

    yield
    ray.shutdown()


@pytest.fixture
def ray_local(_ray_shutdown_at_end):
    """The suite's local Ray instance, started on first use and kept for the tests after."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)  # CPU CI's, on any machine
    return ray


@pytest.fixture
def no_suite_ray():
    """Stops the suite's Ray for a test that starts its own cluster: two on 2 cores race for ports and CPUs."""
    import ray

    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(sample, tmp_path_factory) -> Path:
    """The tiny Qwen2 with a tokenizer trained on the sample, saved like any Hugging Face model."""
    from harness.agents.making import make_tiny

    return make_tiny(sample, tmp_path_factory.mktemp("models") / "tiny-qwen2")


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    """SmolLM2-135M-Instruct as imported by `harness model import smollm2`, converted once per machine into
    `$HARNESS_TEST_CACHE/smollm2` (default `~/.cache/behaviorbench-harness/smollm2`) and reused after."""
    root = Path(os.environ.get("HARNESS_TEST_CACHE", Path.home() / ".cache" / "behaviorbench-harness"))
    model = root / "smollm2"
    if not (model / "config.json").exists():
        command = [sys.executable, "-m", "harness.cli", "model", "import", "smollm2", "--out", str(model)]
        subprocess.run(command, check=True, cwd=Path(__file__).parents[1])
    return model
