"""Where the harness's files live: one storage root for relative paths, and URIs that stay URIs.

Relative paths in configs (data, runs, predictions, leaderboards, local models, taxonomies) resolve against
the storage root: `$HARNESS_ROOT`, else the current directory. A Ray job needs it: its current directory is a
copy of the uploaded code, without the gitignored `artifacts/` and `results/`, so its entrypoint takes
`--root DIR` (`python jobs/evaluate.py --root "$PWD" ...`). A URI such as `s3://bucket/runs` is never turned
into a local path.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import TypeVar

from harness.errors import ConfigError
from harness.names import check_name

ROOT_ENV = "HARNESS_ROOT"
ARTIFACTS = "artifacts"  # the harness's own tree: a model reference under it is a local path, never a hub id
# Config keys (of any config section) that hold a path; model references go through `harness.model.local_or_hub`.
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


def local_path(path: str | Path, key: str) -> Path:
    """`path` resolved against the root, as a local path (a shared file system mounted on every node counts); a URI
    is refused with one line naming `key`, never turned into `./s3:/...`."""
    text = resolve(path)
    if is_uri(text):
        raise ConfigError(f"{key}: {path}: storage URIs are not supported here yet; use a path every node mounts")
    return Path(text)


def run_dir(runs_dir: str | Path, name: str) -> Path:
    """Where training run `name` keeps its checkpoints, config and `final` model."""
    return local_path(runs_dir, "runs_dir") / check_name(name, "run name")


def sweep_dir(runs_dir: str | Path, name: str) -> Path:
    """Where sweep `name` keeps its Tune experiment, trials, `trials.parquet` and `best.json`."""
    return local_path(runs_dir, "runs_dir") / "sweeps" / check_name(name, "sweep name")


def model_path(reference: str, runs_dir: str | Path) -> str:
    """A model reference as a loadable path or hub id: `run:NAME` is that run's final model, `sweep:NAME:best`
    the best trial of a sweep (names never leave `runs_dir`); anything else goes to `harness.model.local_or_hub`."""
    from harness.model import local_or_hub

    if reference.startswith("run:"):
        path = run_dir(runs_dir, check_name(reference[4:], f"model {reference}")) / "final"
        if not (path / "config.json").exists():
            raise ConfigError(f"model {reference}: no finished training run at {path}")
        return str(path)
    if reference.startswith("sweep:"):
        parts = reference.split(":")
        if len(parts) != 3 or parts[2] != "best":
            raise ConfigError(f"model {reference}: expected sweep:<sweep name>:best")
        best = sweep_dir(runs_dir, check_name(parts[1], f"model {reference}")) / "best.json"
        if not best.exists():
            raise ConfigError(f"model {reference}: no finished sweep at {best.parent}")
        return json.loads(best.read_text())["final_model"]
    path = local_or_hub(reference)
    if Path(path).is_dir() and not (Path(path) / "config.json").exists():
        raise ConfigError(f"model {reference}: {path} is not a Hugging Face model directory (no config.json)")
    return path


def looks_local(reference: str) -> bool:
    """Whether a model reference can only be a local path: `./x`, `/x`, `~/x`, `a/b/c`, `artifacts/x`, or
    `a/b` where a directory `a` exists under the root. Anything else of the form `org/name` is a hub id."""
    if reference.startswith((".", "/", "~")) or reference.count("/") != 1:
        return True
    first = reference.split("/", 1)[0]
    return first == ARTIFACTS or (not is_uri(root()) and (Path(root()) / first).is_dir())


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


def job_main(command: str, argv: list[str]) -> int:
    """A Ray job entrypoint: `harness COMMAND ARGS`, where `--root DIR` (anywhere in ARGS) sets the storage root."""
    from harness.cli import run

    parser = argparse.ArgumentParser(prog=f"jobs {command}", add_help=False, allow_abbrev=False)
    parser.add_argument("--root", help="the storage root: a directory the job can reach, or a URI")
    known, rest = parser.parse_known_args(argv)
    if known.root is not None:
        if not is_uri(known.root) and not Path(known.root).expanduser().is_dir():
            print(f"error: --root {known.root}: no such directory on this node", flush=True)
            return 1
        os.environ[ROOT_ENV] = known.root
    return run([command, *rest])
