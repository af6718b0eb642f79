"""Errors the harness reports to users as one clear message (never a traceback)."""

from __future__ import annotations

import os
import traceback
from datetime import datetime, timezone
from pathlib import Path

LOG_DIR_ENV = "HARNESS_LOG_DIR"
DEFAULT_LOG_DIR = Path("artifacts/logs")


def first_line(exc: BaseException) -> str:
    """The first line of `exc`'s message, or its type's name when it has none: for one-line errors."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class HarnessError(Exception):
    """An error a user can fix; the CLI prints it and exits non-zero."""


class ConfigError(HarnessError):
    """A config or taxonomy file is wrong; the message names the file and the key."""


class DataError(HarnessError):
    """A data file is wrong; `problems` holds one `PATH:LINE: field: message` line each."""

    def __init__(self, problems: list[str], summary: str):
        super().__init__("\n".join([summary, *problems]))
        self.problems = problems
        self.summary = summary

    def __reduce__(self) -> tuple[type, tuple[list[str], str]]:  # Ray pickles errors raised in workers
        return (type(self), (self.problems, self.summary))


def _causes(exc: BaseException) -> list[BaseException]:
    """What `exc` wraps: Ray's `.cause`, Ray Train's controller or first worker failure, then Python's chain."""
    wrapped = [
        getattr(exc, "cause", None),
        getattr(exc, "controller_failure", None),
        *[failure for _, failure in sorted((getattr(exc, "worker_failures", None) or {}).items())][:1],
        exc.__cause__,
        None if exc.__suppress_context__ else exc.__context__,
    ]
    return [cause for cause in wrapped if isinstance(cause, BaseException)]


def exception_chain(exc: BaseException) -> list[BaseException]:
    """`exc`, what it wraps, what that wraps, ...: the last one is the root cause."""
    chain = [exc]
    while causes := [c for c in _causes(chain[-1]) if all(c is not seen for seen in chain)]:
        chain.append(causes[0])
    return chain


def log_dir() -> Path:
    """$HARNESS_LOG_DIR; else artifacts/logs under the storage root when that is a directory (a job's `--root`: the
    job's own working directory is a temporary copy that Ray deletes); else ./artifacts/logs."""
    from harness.store import ROOT_ENV, is_uri  # the store's errors come from this module

    if os.environ.get(LOG_DIR_ENV):
        return Path(os.environ[LOG_DIR_ENV])
    root = os.environ.get(ROOT_ENV)
    return Path(root).expanduser() / DEFAULT_LOG_DIR if root and not is_uri(root) else DEFAULT_LOG_DIR


def new_log(kind: str) -> Path:
    """A new log file's path under `log_dir()`, which is created if needed."""
    directory = log_dir()
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return directory / f"{kind}-{stamp}-{os.getpid()}.log"


def crash_log(exc: BaseException) -> Path:
    """Write every traceback of `exc`'s chain to a new file under `log_dir()`."""
    path = new_log("harness")
    parts = ["".join(traceback.format_exception(link, chain=False)) for link in exception_chain(exc)]
    with path.open("x", encoding="utf-8") as handle:  # never overwrites an earlier log
        handle.write("\nwhich was caused by:\n\n".join(parts))
    return path


def crash_message(exc: BaseException) -> str:
    """One line for an unexpected error: its root cause and where the full traceback went."""
    root = exception_chain(exc)[-1]
    text = str(root).strip()
    summary = type(root).__name__ + (f": {text.splitlines()[0]}" if text else "")
    try:
        saved = f"full traceback: {crash_log(exc)}"
    except OSError as error:
        saved = f"full traceback not saved: {error}"
    return f"error: {summary} ({saved})"
