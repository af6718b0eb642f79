"""The quiet console: library output (this process, its children) goes to a log file; harness lines stay."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.core import storage
from harness.train.driver import watched

SCRIPT = """
import os, subprocess, sys
from rich.console import Console
from harness.cli.console import captured_output

console = Console(width=120)
with captured_output(console, "unit", verbose={verbose}) as log:
    print("library print")
    os.write(2, b"library stderr\\n")
    subprocess.run(["echo", "child process"], check=True)
    console.print("harness progress")
print("after:", log)
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_library_output_goes_to_the_log_and_harness_lines_to_the_terminal(tmp_path: Path, verbose: bool):
    env = {**os.environ, "HARNESS_LOG_DIR": str(tmp_path / "logs")}
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(verbose=verbose)], capture_output=True, text=True, env=env, timeout=60
    )
    assert run.returncode == 0, run.stderr
    terminal = run.stdout + run.stderr
    (log,) = (tmp_path / "logs").glob("unit-*.log")
    logged = log.read_text()
    assert "harness progress" in terminal and f"full log: {log}" in terminal and f"after: {log}" in run.stdout
    for line in ("library print", "library stderr", "child process"):
        assert line in logged
        assert (line in terminal) is verbose
    assert "harness progress" not in logged


def test_progress_bars_show_training_steps_with_the_latest_metrics_and_evaluated_tasks():
    from io import StringIO

    from rich.console import Console

    from harness.cli.console import progress_bars

    out = StringIO()
    with progress_bars(Console(file=out, width=150, force_terminal=False)) as bars:
        bars.training("behaviorsft-tiny", 4, 12, {"loss": 2.5, "dev_macro_f1": 0.41, "tokens_per_s": 900.0})
        bars.training("behaviorsft-tiny", 12, 12, {"loss": 1.25, "dev_loss": 1.5, "dev_macro_f1": 0.625})
        bars.evaluation("zero-shot", 16, 40)
        bars.evaluation("zero-shot", 16, 40)
    shown = out.getvalue()
    assert "behaviorsft-tiny" in shown and "12/12" in shown
    assert "loss 1.250  dev_loss 1.500  dev_macro_f1 0.625" in shown
    assert "zero-shot" in shown and "32/40" in shown and "tokens_per_s" not in shown


def test_progress_watching_reports_each_runs_latest_and_never_stops_the_work(tmp_path):
    good, torn, gone = (storage.location(str(tmp_path / name), "progress") for name in ("a", "b", "c"))
    good.write_text(json.dumps({"step": 3, "total": 4, "metrics": {"loss": 0.5}}))
    torn.write_text('{"step": 1, "tot')  # unreadable: skipped, the others still reported
    seen: list[tuple] = []
    with watched(lambda: {"a": good, "b": torn, "c": gone}, lambda *report: seen.append(report)):
        good.write_text(json.dumps({"step": 4, "total": 4, "metrics": {"loss": 0.25}}))
    assert seen[-1] == ("a", 4, 4, {"loss": 0.25}) and {name for name, *_ in seen} == {"a"}

    def unreachable() -> dict:
        raise OSError("storage unreachable")

    with watched(unreachable, lambda *report: seen.append(report)):
        pass  # the block's own result is what counts: no error from watching
