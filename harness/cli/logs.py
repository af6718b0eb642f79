"""Log files of the command line: each long command's full output, and the traceback of an unexpected error."""

from __future__ import annotations

import os
import traceback
from datetime import datetime, timezone
from pathlib import Path

from harness.core.errors import exception_chain
from harness.core.storage import ROOT_ENV, is_uri

LOG_DIR_ENV = "HARNESS_LOG_DIR"
DEFAULT_LOG_DIR = Path("artifacts/logs")


def log_dir() -> Path:
    """$HARNESS_LOG_DIR; else artifacts/logs under the storage root when that is a directory (a job's `--root`: the
    job's own working directory is a temporary copy that Ray deletes); else ./artifacts/logs."""
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
