"""Model references: what a config's `model` names, and where that model is loaded from.

A reference is a packaged model's name (`smollm2`), a model named in the models dir (`tiny-qwen2`), a local
directory, a storage URI (`s3://bucket/models/x`), or a hub id (`org/name`). `run:NAME` and `sweep:NAME:best`
name what training made: `harness.train.layout` resolves them.
"""

from __future__ import annotations

import os
from pathlib import Path

from harness.agents.making import PACKAGED_MODELS, import_packaged
from harness.core import storage
from harness.core.errors import ConfigError
from harness.core.names import name_problem

TINY_MODEL = "tiny-qwen2"  # the embedded default's name in models_dir()
ARTIFACTS = "artifacts"  # the harness's own tree: a model reference under it is a local path, never a hub id
MODEL_CONFIG = "config.json"  # what every Hugging Face model directory holds


def reference_problem(reference: str) -> str | None:
    """What is wrong with the form of a model reference `run:NAME` or `sweep:NAME:best` (None: nothing, or it
    is another kind of reference)."""
    if reference.startswith("run:"):
        return name_problem(reference[4:])
    if reference.startswith("sweep:"):
        parts = reference.split(":")
        return name_problem(parts[1]) if len(parts) == 3 and parts[2] == "best" else "expected sweep:<sweep name>:best"
    return None


def models_dir() -> Path:
    """Where named models live (packaged imports, the tiny model): `$HARNESS_MODELS_DIR`, else `artifacts/models`,
    under the storage root (see `harness.core.storage`)."""
    return Path(storage.resolve(os.environ.get("HARNESS_MODELS_DIR", "artifacts/models")))


def local_or_hub(name_or_path: str, key: str) -> str:
    """Resolve a model reference, in this order: a packaged model's name (`smollm2`), imported into `models_dir()`
    on first use; a model named in `models_dir()` (`tiny-qwen2`, from `harness model make-tiny`); an existing local
    directory (relative to the storage root), made absolute; otherwise a hub id (`org/name`). A reference that can
    only be local (`artifacts/x`, `./x`, `a/b/c`, a bare name) and is missing is refused, never looked up on a hub.
    A name wins over a directory of the same name in the current directory (write `./smollm2` for that). A storage
    URI (`s3://bucket/models/x`) stays a URI: each node loads it through `local_copy`. `key` names the reference's
    config key in the error."""
    if storage.is_uri(name_or_path):
        return name_or_path
    named = models_dir() / name_or_path
    if name_or_path in PACKAGED_MODELS:
        if not is_model_dir(named):
            print(f"importing packaged model {name_or_path} into {named} (first use)", flush=True)
            import_packaged(name_or_path, named)
        return str(named.resolve())
    if "/" not in name_or_path and is_model_dir(named):
        return str(named.resolve())
    path = Path(storage.resolve(name_or_path))
    if path.exists():
        return str(path)
    if looks_local(name_or_path):
        raise ConfigError(
            f"{key}: {name_or_path} is neither a model in {models_dir()}, an existing directory "
            f"({path}: relative paths resolve against ${storage.ROOT_ENV}, else the current directory) nor a hub id "
            f"like org/name (run `harness model make-tiny` for {TINY_MODEL}; packaged models: "
            f"{', '.join(PACKAGED_MODELS)})"
        )
    return name_or_path


def local_copy(path: str) -> str:
    """A loadable model path: a model in an object store (`s3://bucket/runs/NAME/final`) is downloaded once per
    node, through Ray's checkpoint API, into `cache_root()/models` (`harness.core.storage`) under a key of its files'
    sizes and times (a retrained run is a new key); a local path or hub id is returned as is."""
    if not storage.is_uri(path):
        return path
    from ray.train import Checkpoint

    stamp = model_stamp(path)
    if not stamp:
        raise ConfigError(f"model {path}: no files there")
    return str(storage.cached_copy("models", f"{path}|{stamp}", lambda tmp: Checkpoint(path).to_directory(str(tmp))))


def is_model_dir(path: str | Path | storage.Location) -> bool:
    """Whether `path` (a local directory, or a directory in an object store) holds a Hugging Face model."""
    where = path if isinstance(path, storage.Location) else storage.location(path, "model")
    return where.child(MODEL_CONFIG).exists()


def model_stamp(path: str) -> str:
    """What identifies a model's weights: its files' sizes and times (a local directory, or a directory in an
    object store), or else the hub id."""
    return storage.location(path, "model").stamp() if storage.is_uri(path) or Path(path).is_dir() else path


def looks_local(reference: str) -> bool:
    """Whether a model reference can only be a local path: `./x`, `/x`, `~/x`, `a/b/c`, `artifacts/x`, or
    `a/b` where a directory `a` exists under the root. Anything else of the form `org/name` is a hub id."""
    if reference.startswith((".", "/", "~")) or reference.count("/") != 1:
        return True
    first = reference.split("/", 1)[0]
    return first == ARTIFACTS or (not storage.is_uri(storage.root()) and (Path(storage.root()) / first).is_dir())


def loadable(reference: str, key: str) -> str:
    """A reference that is not `run:`/`sweep:` as a loadable path or hub id (`local_or_hub`); a local directory
    must hold a model."""
    path = local_or_hub(reference, key)
    if Path(path).is_dir() and not is_model_dir(path):
        raise ConfigError(f"{key} {reference}: {path} is not a Hugging Face model directory (no {MODEL_CONFIG})")
    return path
