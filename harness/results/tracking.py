"""Experiment tracking of training runs, sweep trials and evaluations: MLflow by default, W&B as an option.

Ray Train 2.60 (Train V2) refuses Tune's logger callbacks in `RunConfig(callbacks=...)` ("Passing in a Ray
Tune callback is no longer supported"); the way it documents (the "Experiment Tracking" user guide) is to
call the tracking library from the training function itself, on the rank-0 worker. `BehaviorSFTRecipe`
does that through `open_run`; an evaluation's driver opens one run per agent. The tracking library is
imported only when a run is opened (`import mlflow` takes seconds).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse
from urllib.request import url2pathname

from harness.core import storage
from harness.core.config import flatten
from harness.core.errors import ConfigError

BACKENDS = ("mlflow", "wandb", "none")
BATCH = 100  # MLflow's log_batch takes at most 100 params or tags per call
MAX_VALUE = 6000  # MLflow's limit on the length of a param value
ARTIFACTS = "artifacts"  # MLflow 3.17's file store takes no run under a directory of this name (ZDI-CAN-26649)


@dataclass
class TrackingSettings:
    backend: str = "mlflow"  # mlflow, wandb (offline runs) or none
    uri: str | None = None  # MLflow tracking URI, or a directory; None: `mlruns` (W&B: `wandb`), see default_store
    experiment: str | None = None  # None: the kind of run, "train" or "eval"; a sweep's trials use "sweep-<name>"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: {self.backend!r} is not one of {list(BACKENDS)}")
        if self.backend == "wandb" and importlib.util.find_spec("wandb") is None:
            raise ValueError("backend: wandb is selected but not installed: pip install 'behaviorbench-harness[wandb]'")

    def resolved(self, root: str | Path) -> TrackingSettings:
        """These settings with `uri` absolute, as the driver sees it: a path, or by default the directory
        `default_store(root)`, becomes a `file:` URI; a server URI stays."""
        name, results = "wandb" if self.backend == "wandb" else "mlruns", storage.resolve(root)
        if self.uri:
            uri = self.uri
        elif not storage.is_uri(results):
            uri = str(default_store(Path(results), name))
        elif not storage.is_uri(storage.root()):  # results in an object store: the file store stays local, at the root
            uri = str(Path(storage.root()) / name)
        else:
            raise ConfigError(f"tracking.uri: {root} is in an object store; set tracking.uri (a server or a directory)")
        if not ("://" in uri or uri.startswith("file:")):
            uri = Path(storage.resolve(uri)).as_uri()
        local = _local(uri) if uri.startswith("file:") else None
        if self.backend == "mlflow" and local is not None and ARTIFACTS in local.parts:
            raise ConfigError(
                f"tracking.uri: MLflow's file store cannot keep runs under a directory named {ARTIFACTS!r} "
                f"({local}); choose another directory or a tracking server"
            )
        return replace(self, uri=uri)


def default_store(root: Path, name: str) -> Path:
    """The default store `name` of runs kept in `root` (the runs or evaluation output directory): beside
    `root`, or beside its outermost ancestor named `artifacts` (the default `artifacts/runs` puts `mlruns` at
    the storage root), since MLflow's file store refuses a run whose path has an `artifacts` component."""
    root = root.resolve()
    named = [path for path in (root, *root.parents) if path.name == ARTIFACTS]
    return (named[-1] if named else root).parent / name


def _local(uri: str) -> Path:
    return Path(url2pathname(urlparse(uri).path))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _chunks(items: list, size: int = BATCH) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Tracker(Protocol):
    run_id: str

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None: ...

    def set_tags(self, tags: dict[str, Any]) -> None: ...

    def log_json(self, name: str, data: dict[str, Any]) -> None: ...

    def log_file(self, path: Path) -> None: ...

    def finish(self, ok: bool = True) -> None: ...


class NoTracker:
    """Tracking off (`backend: none`), and every training worker but rank 0."""

    run_id = ""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_json(self, name: str, data: dict[str, Any]) -> None:
        pass

    def log_file(self, path: Path) -> None:
        pass

    def finish(self, ok: bool = True) -> None:
        pass


def _experiment_id(client: Any, name: str) -> str:
    """The id of MLflow experiment `name`, created if missing."""
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


def create_experiment(settings: TrackingSettings, kind: str) -> None:
    """Create the experiment that concurrent runs (a sweep's trials) will open their runs in, before they start:
    MLflow's file store creates experiments without a lock, so runs racing to create one fail on each other's
    half-written experiment or make duplicates. `settings` must be resolved."""
    if settings.backend == "mlflow" and settings.uri:
        _experiment_id(_mlflow_client(settings.uri), settings.experiment or kind)


def _mlflow_client(uri: str) -> Any:
    if uri.startswith("file:"):
        # MLflow 3.17 refuses its file store unless told: the store is in maintenance mode, but it needs
        # no database or server, and its runs are plain files beside the harness's own artifacts.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


class MlflowTracker:
    """One MLflow run through `MlflowClient` (no global active run, so nothing leaks between runs of a process)."""

    def __init__(self, uri: str, experiment: str, name: str, run_id: str | None):
        self.client = _mlflow_client(uri)
        experiment_id = _experiment_id(self.client, experiment)
        # A run gone from the store (mlruns deleted, or another experiment asked for) goes on in a new one.
        if run_id and self.client.search_runs([experiment_id], f"attributes.run_id = '{run_id}'"):
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params  # MLflow params are write-once: a resumed run keeps its
        new = [Param(k, _text(v)[:MAX_VALUE]) for k, v in flatten(params).items() if k not in have]
        for chunk in _chunks(new):
            self.client.log_batch(self.run_id, params=chunk)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(k, v, now, step) for k, v in _numbers(metrics).items()]
        for chunk in _chunks(values):
            self.client.log_batch(self.run_id, metrics=chunk)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        for chunk in _chunks([RunTag(k, _text(v)) for k, v in flatten(tags).items()]):
            self.client.log_batch(self.run_id, tags=chunk)

    def log_json(self, name: str, data: dict[str, Any]) -> None:
        self.client.log_dict(self.run_id, data, name)

    def log_file(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class WandbTracker:
    """One offline W&B run under the directory of `uri` (`wandb sync` uploads it later)."""

    def __init__(self, uri: str, experiment: str, name: str, run_id: str | None):
        import wandb

        directory = _local(uri)
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=experiment, name=name, id=run_id, resume="allow", mode="offline", dir=str(directory)
        )
        self.run_id = self.run.id

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(flatten(params), allow_val_change=True)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(_numbers(metrics), step=step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.run.summary.update(flatten(tags))

    def log_json(self, name: str, data: dict[str, Any]) -> None:
        path = Path(self.run.dir) / name
        path.write_text(json.dumps(data, indent=2, default=str))
        self.log_file(path)

    def log_file(self, path: Path) -> None:
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def finish(self, ok: bool = True) -> None:
        self.run.finish(exit_code=0 if ok else 1)


def open_run(
    settings: TrackingSettings,
    kind: str,
    name: str,
    state: Path | storage.Location,
    params: dict[str, Any],
    record: dict[str, Any],
) -> Tracker:
    """The tracking run of harness run `name`, with its `params` and its run `record` (tags and run_record.json).

    The run whose id the file `state` holds (same backend and URI) is continued, so a resumed training run
    goes on in its tracking run; otherwise a new one is started in experiment `settings.experiment` (default
    `kind`) and recorded in `state`. `settings` must be resolved (`TrackingSettings.resolved`).
    """
    if settings.backend == "none":
        return NoTracker()
    if not settings.uri:
        raise ValueError("tracking settings must be resolved before a run is opened")
    state = state if isinstance(state, storage.Location) else storage.location(state, "tracking state")
    known = json.loads(state.read_text()) if state.exists() else {}
    same_store = known.get("backend") == settings.backend and known.get("uri") == settings.uri
    run_id = known.get("run_id") if same_store else None
    backend = MlflowTracker if settings.backend == "mlflow" else WandbTracker
    try:
        tracker = backend(settings.uri, settings.experiment or kind, name, run_id)
        if tracker.run_id != run_id:
            state.write_text(json.dumps({"backend": settings.backend, "uri": settings.uri, "run_id": tracker.run_id}))
        tracker.log_params(params)
        tracker.set_tags({"record": record})
        tracker.log_json("run_record.json", record)
    except ImportError:
        raise
    except Exception as exc:  # a tracking store that fails must not cost the run itself: say so and go on
        reason = (str(exc).strip().splitlines() or [""])[0]
        print(f"[harness] tracking off for {name}: {type(exc).__name__}: {reason}", file=sys.stderr, flush=True)
        return NoTracker()
    return tracker
