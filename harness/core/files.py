"""Atomic writes of results (a reader sees the old file or the new one, never a partial one), and UTF-8 reads."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from harness.core.errors import HarnessError

if TYPE_CHECKING:
    import pandas as pd

SIGNATURE_BYTES = 200  # how much of an existing output's first line tells whose it is


def _temp_pattern(path: Path) -> re.Pattern[str]:
    """The names of the temporary siblings of `path` (files and directories): `.NAME.<32 hex digits>.tmp`."""
    return re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{32}}\.tmp")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temps(path: Path) -> None:
    """Remove the temporary siblings of `path` (files or directories) left by killed writers; a live writer
    holds a lock on its own."""
    pattern = _temp_pattern(path)
    for candidate in path.parent.iterdir():
        if not pattern.fullmatch(candidate.name) or candidate.is_symlink():
            continue
        try:
            fd = os.open(candidate, os.O_RDONLY)
        except FileNotFoundError:  # its writer finished meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        else:
            if candidate.is_dir():
                shutil.rmtree(candidate, ignore_errors=True)
            else:
                candidate.unlink(missing_ok=True)
        finally:
            os.close(fd)


@contextmanager
def temporary_dir_beside(path: Path) -> Iterator[Path]:
    """A new, locked directory beside `path` (`.NAME.<hex>.tmp`) for the caller to fill and rename to `path`;
    removed afterwards if it is still there. Directories that killed writers left beside `path` go first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    lock = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # tells other writers of `path` that this directory is in use
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(lock)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write` on a temporary sibling of `path`, then rename it over `path`; both are fsynced.

    Temporary siblings that killed writers left behind are removed first (only names of our own pattern).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    lock = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # tells other writers of `path` that this temp file is in use
        write(tmp)
        _fsync(tmp)
        tmp.replace(path)
        _fsync(path.parent)  # makes the rename itself durable
    finally:
        tmp.unlink(missing_ok=True)
        os.close(lock)


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def directory_problem(path: Path) -> str | None:
    """Why a directory could not be created or written at `path` (a file on the way, no write permission), or None."""
    for ancestor in (path, *path.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                return f"{ancestor} is not a directory"
            return None if os.access(ancestor, os.W_OK | os.X_OK) else f"{ancestor} is not writable"
    return None


def refuse_foreign(path: Path, key: str, ours: Callable[[Path], bool]) -> None:
    """Refuse, naming `key` (the option or key that named `path`), to replace anything at `path` but an empty file
    or one that `ours` recognises as this command's own output: nothing else there is ever overwritten. A file
    that could not be written there is refused too."""
    problem = directory_problem(path.parent)
    if problem:
        raise HarnessError(f"{key}: {path}: {problem}")
    if path.is_dir():
        raise HarnessError(f"{key}: {path} is a directory")
    if path.exists() and not path.is_file():  # a pipe or a device: reading it to check could block
        raise HarnessError(f"{key}: {path} is not a regular file")
    if path.exists() and path.stat().st_size and not ours(path):
        raise HarnessError(f"{key}: {path} exists and was not written by this command; remove it or choose another")


def begins_as(text: str) -> Callable[[Path], bool]:
    """Whether a file's first line is where `text` begins: the same kind of output (an export of one format)."""
    start = text.encode("utf-8")

    def check(path: Path) -> bool:
        with path.open("rb") as handle:
            first = handle.readline(SIGNATURE_BYTES)
        return start.startswith(first)

    return check


def write_output(path: Path, text: str, key: str) -> None:
    """Write an output a user names (an export, a report) atomically, replacing only an earlier output of the same
    kind (`begins_as`); see `refuse_foreign`."""
    refuse_foreign(path, key, begins_as(text))
    write_text(path, text)


def sync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, and `root` itself."""
    for directory, _, names in os.walk(root):
        for name in names:
            _fsync(Path(directory) / name)
        _fsync(Path(directory))


def replace_dir(new: Path, target: Path) -> None:
    """Rename the directory `new` to `target`. An existing `target` is first renamed to a temporary sibling and
    removed after; if the process dies between the two renames, the next writer of `target` removes it."""
    old = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    if target.exists():
        target.rename(old)
    new.rename(target)
    _fsync(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))


def decode_utf8(data: bytes, *, name_line: bool = True) -> str:
    """`data` as text, or ValueError `not UTF-8 text (byte 0xNN at line L, column C)` (no line if not `name_line`)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        where = f"line {line}, column {column}" if name_line else f"column {column}"
        raise ValueError(f"not UTF-8 text (byte 0x{data[exc.start]:02x} at {where})") from None
