"""Where the harness's files live: one storage root for relative paths, and URIs that stay URIs.

Relative paths in configs (data, runs, predictions, leaderboards, local models, taxonomies) resolve against
the storage root: `$HARNESS_ROOT`, else the current directory. A Ray job needs it: its current directory is a
copy of the uploaded code, without the gitignored `artifacts/` and `results/`, so its entrypoint takes
`--root DIR` (`python jobs/evaluate.py --root "$PWD" ...`). A URI such as `s3://bucket/runs` is never turned
into a local path.

Results (`output_dir`, `leaderboard`) may live in an object store: a `Location` is a local path or any pyarrow
filesystem URI (`s3://bucket/prefix`, `gs://...`). pyarrow reads S3 credentials and endpoint from the
standard variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL` for an
S3-compatible server); the process that writes needs them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pyarrow
import pyarrow.fs as pafs

from harness.core.errors import ConfigError, DataError, first_line
from harness.core.files import replace_dir, sync_tree, temporary_dir_beside, write_atomic

if TYPE_CHECKING:
    import pandas as pd

ROOT_ENV = "HARNESS_ROOT"
# Config keys (of any config section) that hold a path; model references go through `harness.agents.references`.
PATH_KEYS = frozenset(
    {"data", "taxonomy", "storage_path", "runs_dir", "output_dir", "leaderboard", "artifacts", "results"}
)
URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")

T = TypeVar("T")


def is_uri(path: str | Path) -> bool:
    """`s3://...`, `gs://...`, `file://...`: a location for a pyarrow filesystem, not a local path."""
    return URI.match(str(path)) is not None


def root() -> str:
    """The storage root: `$HARNESS_ROOT` (a directory or a URI), else the current directory; absolute."""
    value = os.environ.get(ROOT_ENV) or "."
    return value.rstrip("/") if is_uri(value) else str(Path(value).expanduser().resolve())


def resolve(path: str | Path) -> str:
    """`path` against the storage root: a URI unchanged, an absolute path as is, a relative one under the root."""
    text = str(path)
    if is_uri(text):
        return text
    base = root()
    if is_uri(base) and not Path(text).expanduser().is_absolute():
        return f"{base}/{text.removeprefix('./')}"
    return str((Path(base) / Path(text).expanduser()).resolve())


def cache_root() -> Path:
    """This node's cache of what it downloads from storage URIs (models, data): `$HARNESS_CACHE`, else
    `~/.cache/behaviorbench-harness`."""
    return Path(os.environ.get("HARNESS_CACHE", "~/.cache/behaviorbench-harness")).expanduser()


def cached_copy(kind: str, key: str, fetch: Callable[[Path], None]) -> Path:
    """This node's copy of something in storage: `cache_root()/kind/<hash of key>`, filled once by `fetch` on a
    new temporary sibling that is then renamed into place, so it is whole or absent. When another process on
    this node finishes the same copy first, its copy is used."""
    target = cache_root() / kind / hashlib.sha256(key.encode()).hexdigest()[:16]
    if target.exists():
        return target
    with temporary_dir_beside(target) as tmp:
        try:
            fetch(tmp)
            tmp.replace(target)
        except OSError:  # the rename fails onto another process's finished copy, which is then used
            if not target.exists():
                raise
    return target


def local_data(path: str | Path) -> Path:
    """Task data as a local path: a file or directory at a storage URI is downloaded once per node into
    `cache_root()/data`, under a key of its files' sizes and times (changed data is a new key); a local path is
    returned as is."""
    if not is_uri(path):
        return Path(path)
    source = location(path, "data")
    info = source.fs.get_file_info(source.path)
    if info.type == pafs.FileType.NotFound:
        raise DataError([], f"{path}: no such file or directory")
    directory = info.type == pafs.FileType.Directory
    stamp = source.stamp() if directory else f"{info.size}:{info.mtime_ns}"
    copy = cached_copy("data", f"{source}|{stamp}", lambda tmp: _download(source, tmp / info.base_name, directory))
    return copy / info.base_name


def _download(source: Location, out: Path, directory: bool) -> None:
    """Copy the file at `source`, or every file under it with its relative path, to the local path `out`."""
    if not directory:
        pafs.copy_files(source.path, str(out), source_filesystem=source.fs)
        return
    for item in source.fs.get_file_info(pafs.FileSelector(source.path, recursive=True)):
        if item.type == pafs.FileType.File:
            target = out / item.path.removeprefix(f"{source.path}/")
            target.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(item.path, str(target), source_filesystem=source.fs)


@dataclasses.dataclass(frozen=True)
class Location:
    """A results file or directory: a local path or an object under a pyarrow filesystem URI.

    Writes are atomic either way: a local file is written beside its target and renamed over it; an object is
    uploaded whole (one PUT, or a multipart upload that appears only once complete), so no reader sees a part.
    """

    uri: str  # what messages show: the local path or the URI
    fs: pafs.FileSystem
    path: str  # the filesystem's own path

    def __str__(self) -> str:
        return self.uri

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def child(self, name: str) -> Location:
        return Location(f"{self.uri}/{name}", self.fs, f"{self.path}/{name}")

    def sibling(self, name: str) -> Location:
        """The file `name` in the same directory as this one."""
        return Location(f"{self.uri.rsplit('/', 1)[0]}/{name}", self.fs, f"{self.path.rsplit('/', 1)[0]}/{name}")

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def mtime_ns(self) -> int | None:
        """When this file last changed, or None when there is none."""
        info = self.fs.get_file_info(self.path)
        return None if info.type == pafs.FileType.NotFound else info.mtime_ns

    def delete(self) -> None:
        """Remove this file if it exists."""
        if self.fs.get_file_info(self.path).type == pafs.FileType.File:
            self.fs.delete_file(self.path)

    def dirs(self, pattern: str = "*") -> list[str]:
        """The names of the directories directly under this one that match the glob `pattern`, sorted."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        names = [i.base_name for i in infos if i.type == pafs.FileType.Directory]
        return sorted(name for name in names if fnmatch.fnmatchcase(name, pattern))

    def has_dir(self, pattern: str) -> bool:
        """Whether a directory directly under this one has a name matching the glob `pattern`."""
        return bool(self.dirs(pattern))

    def stamp(self) -> str:
        """What identifies the files under this directory: their paths, sizes and times of last change."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        files = sorted((i.path, i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)
        return ";".join(f"{path.removeprefix(self.path)}:{size}:{mtime}" for path, size, mtime in files)

    def put_dir(self, source: Path) -> None:
        """Make this directory a copy of the local directory `source`, replacing what it held. Locally the copy
        is renamed into place; in an object store the files are uploaded one by one, so a reader must wait for a
        marker written after (training writes `final_metrics.json` after its `final/` model)."""
        if self.local:
            target = Path(self.path)
            with temporary_dir_beside(target) as tmp:
                shutil.copytree(source, tmp, dirs_exist_ok=True)
                sync_tree(tmp)
                replace_dir(tmp, target)
            return
        self.fs.delete_dir_contents(self.path, missing_dir_ok=True)
        pafs.copy_files(str(source), self.path, destination_filesystem=self.fs)

    def files(self, pattern: str) -> list[Location]:
        """The files directly under this directory whose names match the glob `pattern`, by name."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File)
        return [self.child(name) for name in names if fnmatch.fnmatchcase(name, pattern)]

    def read_parquet(self, columns: list[str] | None = None) -> pd.DataFrame:
        import pandas as pd

        return pd.read_parquet(self.path, columns=columns, filesystem=self.fs)

    def read_text(self) -> str:
        with self.fs.open_input_stream(self.path) as stream:
            return stream.read().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        if self.local:
            write_atomic(Path(self.path), lambda tmp: tmp.write_bytes(data))
        else:
            with self.fs.open_output_stream(self.path) as out:
                out.write(data)

    def write_parquet(self, frame: pd.DataFrame) -> None:
        self.write_bytes(frame.to_parquet(index=False))

    def write_table(self, data: pyarrow.Table) -> None:
        import pyarrow.parquet as pq

        sink = pyarrow.BufferOutputStream()
        pq.write_table(data, sink)
        self.write_bytes(sink.getvalue().to_pybytes())

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    @contextmanager
    def local_dir(self) -> Iterator[Path]:
        """A local directory for files that a library writes itself: this directory when it is local, else a
        temporary one whose files are uploaded here on exit."""
        if self.local:
            yield Path(self.path)
            return
        with tempfile.TemporaryDirectory(prefix="harness-") as scratch:
            yield Path(scratch)
            for file in sorted(p for p in Path(scratch).rglob("*") if p.is_file()):
                self.child(file.relative_to(scratch).as_posix()).write_bytes(file.read_bytes())


def location(path: str | Path, key: str) -> Location:
    """`path` resolved against the root as a `Location`; a URI that pyarrow cannot open is one line naming `key`."""
    text = resolve(path)
    if not is_uri(text):
        return Location(text, pafs.LocalFileSystem(), text)
    try:
        fs, inner = pafs.FileSystem.from_uri(text)
    except (pyarrow.ArrowException, ValueError, OSError) as exc:
        raise ConfigError(f"{key}: {path}: not a storage location pyarrow can open ({first_line(exc)})") from None
    return Location(text.rstrip("/"), fs, inner.rstrip("/"))


def rooted(cfg: T) -> T:
    """A config (any config dataclass, its sections and lists of sections included) with every path key of
    `PATH_KEYS` resolved against the storage root."""
    changes = {}
    for item in dataclasses.fields(cfg):  # type: ignore[arg-type]
        value = getattr(cfg, item.name)
        if dataclasses.is_dataclass(value):
            changes[item.name] = rooted(value)
        elif isinstance(value, list) and value and all(dataclasses.is_dataclass(v) for v in value):
            changes[item.name] = [rooted(v) for v in value]
        elif item.name in PATH_KEYS and isinstance(value, str):
            changes[item.name] = resolve(value)
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]
