"""A quiet console: what Ray, Tune, DeepSpeed and Hugging Face print goes to a log file, not the terminal, and the
harness's own progress bars go there instead.

Long commands (train, sweep, eval, demo) run inside `captured_output`: file descriptors 1 and 2, which
every Ray worker and library writes to, are pointed at a new log file, and the harness's own progress
and tables go to the terminal. With `verbose`, the terminal also shows everything (through `tee`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console

from harness.cli.logs import new_log


@contextmanager
def captured_output(console: Console, command: str, verbose: bool) -> Iterator[Path]:
    """Send fds 1 and 2 to a new log file (also to the terminal when `verbose`); `console` keeps the terminal."""
    log = new_log(command)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    with log.open("ab") as sink:
        tee = None
        if verbose:  # `tee` ends by itself once the last writer (a Ray process) closes the pipe
            tee = subprocess.Popen(["tee", "-a", str(log)], stdin=subprocess.PIPE, stdout=saved[1])
            target = tee.stdin.fileno()
        else:
            target = sink.fileno()
        # Its own file, not `console.file`, which falls back to the sys.stdout of the moment (pytest's, say).
        previous_file = console._file
        console.file = terminal
        console.print(f"full log: {log}", highlight=False)
        for fd in (1, 2):
            os.dup2(target, fd)
        ray = sys.modules.get("ray")
        started_here = ray is None or not ray.is_initialized()
        try:
            yield log
        finally:
            ray = sys.modules.get("ray")
            if started_here and ray is not None and ray.is_initialized():
                ray.shutdown()  # the command's own cluster: its workers' output would reach the terminal after
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, original in saved.items():
                os.dup2(original, fd)
                os.close(original)
            console._file = previous_file
            terminal.close()
            if tee is not None:
                tee.stdin.close()


SHOWN_TRAINING = ("loss", "dev_loss", "dev_macro_f1")  # the latest report's metrics shown beside a run's bar


class ProgressBars:
    """Bars on the terminal: one per evaluated agent (tasks done) and one per training run (steps done, with
    its latest loss and dev metrics)."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.bars: dict[str, int] = {}

    def _bar(self, name: str, total: int) -> int:
        if name not in self.bars:
            self.bars[name] = self.progress.add_task(name, total=total, latest="")
        return self.bars[name]

    def evaluation(self, agent: str, done: int, total: int) -> None:
        self.progress.advance(self._bar(agent, total), done)

    def training(self, run: str, step: int, total: int, metrics: dict[str, float]) -> None:
        latest = "  ".join(f"{key} {metrics[key]:.3f}" for key in SHOWN_TRAINING if key in metrics)
        self.progress.update(self._bar(run, total), completed=step, total=total, latest=latest)


@contextmanager
def progress_bars(console: Console) -> Iterator[ProgressBars]:
    """Bars on `console` for the duration of the block."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[latest]}"))
    with Progress(TextColumn("{task.description}"), *columns, console=console) as progress:
        yield ProgressBars(progress)
