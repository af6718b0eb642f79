"""What a driver imports: heavy modules load only where they are used."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import harness


@pytest.mark.parametrize(
    ("modules", "left_out"),
    [
        ("harness.train, harness.evaluate", "mlflow"),  # imported when a run is tracked
        ("harness.evaluate, harness.cli", "torch"),  # an evaluation's driver runs no model: 1.6 s saved
    ],
)
def test_importing_leaves_heavy_modules_out(modules: str, left_out: str):
    code = f"import sys, {modules}; print({left_out!r} in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(Path(harness.__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.stdout.strip() == "False", result.stderr


def test_an_evaluation_records_its_hardware_without_importing_torch():
    code = (
        "import sys; from harness.results.run_record import run_record; "
        "record = run_record({}, {}); print(isinstance(record['hardware']['gpus'], list), 'torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(harness.__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.stdout.split() == ["True", "False"], result.stderr
