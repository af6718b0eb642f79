"""Ray Tune sweeps over token designs and hyperparameters of BehaviorSFT.

Each trial is the same `harness.train.train` run (a `TorchTrainer` over DeepSpeed) with Tune's
report callback; trials report the dev-split Macro F1 of behavior selection, computed by the
evaluation scorer. ASHA stops poor trials early; a failed trial is recorded with its error; a
restarted sweep resumes with `Tuner.restore`. Results land in `trials.parquet`, and the best
finished trial in `best.json`, so `harness eval` can take `model: sweep:<name>:best`.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from harness.agents.references import is_model_dir
from harness.agents.tokens import TokenDesign
from harness.core.cluster import check_reachable, connect
from harness.core.config import build, get_dotted, set_dotted, to_dict
from harness.core.errors import ConfigError
from harness.core.names import check_name
from harness.results.tracking import create_experiment
from harness.train.config import RUNTIME_KEYS, TrainConfig
from harness.train.driver import TrainProgress, train, watched
from harness.train.layout import TUNE_EXPERIMENT, SweepFiles, refuse_changed, sweep_files
from harness.train.recipe import deepspeed_env

TRIAL_MEMORY = 64 * 2**20  # bytes reserved by a trial's driver function
SAMPLERS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclass
class SchedulerSettings:
    type: str = "asha"  # asha or fifo
    grace_period: int = 1  # reports (epochs) before a trial can be stopped
    reduction_factor: int = 2

    def __post_init__(self) -> None:
        if self.type not in ("asha", "fifo"):
            raise ValueError(f"scheduler.type: {self.type!r} is not one of ['asha', 'fifo']")


# What a trial reports that a sweep can rank by: rank 0's dev metrics and its latest training loss.
SWEEP_METRICS = ("dev_macro_f1", "dev_loss", "loss")
# How the sweep and its trials run, not what they find.
SWEEP_RUNTIME_KEYS = ("address", "max_concurrent_trials", "trial_cpus", *(f"train.{key}" for key in RUNTIME_KEYS))


@dataclass
class SweepConfig:
    name: str = "token-designs"
    train: TrainConfig = field(default_factory=TrainConfig)
    search_space: dict[str, dict[str, list]] = field(default_factory=dict)
    num_samples: int = 1
    max_concurrent_trials: int = 1
    # The trial's driver function only waits on its trainer, whose workers reserve their own CPUs: reserving
    # more for it keeps N trials of one-CPU workers from sharing N cores (the second waits for the first).
    trial_cpus: float = 0.0
    metric: str = "dev_macro_f1"
    mode: str = "max"
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    runs_dir: str = "artifacts/runs"
    address: str | None = None  # the Ray cluster (HOST:PORT); None: $RAY_ADDRESS, else a local cluster

    def __post_init__(self) -> None:
        check_name(self.name, "name")  # it becomes a directory
        if self.metric not in SWEEP_METRICS:
            raise ValueError(f"metric: {self.metric!r} is not one of {list(SWEEP_METRICS)}")
        if self.mode not in ("max", "min"):
            raise ValueError(f"mode: {self.mode!r} is not one of ['max', 'min']")
        for key in ("num_samples", "max_concurrent_trials"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be at least 1, got {getattr(self, key)}")
        if self.trial_cpus < 0:
            raise ValueError(f"trial_cpus: must be at least 0, got {self.trial_cpus}")
        if self.train.mode != "behaviorsft":
            raise ValueError("train.mode: sweeps optimise behavior selection, so the mode must be behaviorsft")
        for key, spec in self.search_space.items():
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
                raise ValueError(f"search_space.{key}: expected one of {{{', '.join(SAMPLERS)}: [values]}}")
            kind, values = next(iter(spec.items()))
            try:
                values = _sampler_values(kind, values)
            except ValueError as exc:
                raise ValueError(f"search_space.{key}.{kind}: {exc}") from None
            self.search_space[key] = {kind: values}
            for value in _candidates(kind, values):  # every candidate must make a valid training config
                try:
                    build(TrainConfig, _with(to_dict(self.train), key, value), "search_space")
                except ConfigError as exc:
                    raise ValueError(f"search_space.{key}={value!r}: {exc}") from None

    @property
    def files(self) -> SweepFiles:
        return sweep_files(self.runs_dir, self.name)


def _bound(value: object, integer: bool) -> int | float | None:
    """`value` as a sampler bound, or None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (not integer and isinstance(value, float)):
        return value
    if not integer and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-4 as a string
        except ValueError:
            return None
    return None


def _sampler_values(kind: str, values: object) -> list:
    """The values of one sampler, checked (bounds made numbers); a ValueError says what is wrong."""
    if kind in ("grid", "choice"):
        if not isinstance(values, list) or not values:
            raise ValueError(f"expected a non-empty list of values, got {values!r}")
        return values
    if not isinstance(values, list) or len(values) != 2:
        raise ValueError(f"expected [low, high], got {values!r}")
    low, high = bounds = [_bound(v, integer=kind == "randint") for v in values]
    if low is None or high is None:
        raise ValueError(f"expected {'integers' if kind == 'randint' else 'numbers'} [low, high], got {values!r}")
    if low >= high:
        raise ValueError(f"low must be below high, got {values!r}")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"low must be above 0 (a log scale), got {values!r}")
    return bounds


def _candidates(kind: str, values: list) -> list:
    """The values a sampler can give that are checked up front: all of a grid or choice, else both ends."""
    if kind in ("grid", "choice"):
        return list(values)
    return [values[0], values[1] - 1] if kind == "randint" else list(values)  # randint's high is exclusive


def _with(values: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of the training config `values` with `dotted` set to `value`."""
    values = copy.deepcopy(values)
    set_dotted(values, dotted, value, f"search_space.{dotted}")
    return values


def param_space(cfg: SweepConfig) -> dict[str, Any]:
    """The Tune param space: the training config with each searched key replaced by its sampler."""
    from ray import tune

    samplers = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(*v),
    }
    values = to_dict(cfg.train)
    for key, spec in cfg.search_space.items():
        kind, choices = next(iter(spec.items()))
        values = _with(values, key, samplers[kind](list(choices)))
    return {"train": values}


def run_trial(config: dict[str, Any]) -> None:
    """One Tune trial: a full training run whose reports reach Tune through its callback."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial = ray.tune.get_context().get_trial_id()
    cfg = build(TrainConfig, {**config["train"], "run_name": trial})
    train(cfg, callbacks=[TuneReportCallback()])


def dev_type_keys(keys: Iterable[str]) -> list[str]:
    """The keys among `keys` of a trial's dev share right per task type (`dev_restraint`, ...): its dev metrics
    other than those a sweep ranks by."""
    return [key for key in keys if key.startswith("dev_") and key not in SWEEP_METRICS]


def _ranked_trials(results, cfg: SweepConfig) -> list[dict[str, Any]]:
    """One record per trial, best first by `cfg.metric` (ties broken by trial id: the same ranking on every
    restore). `searched` holds the searched keys' typed values, which the training after the sweep takes."""
    records = []
    for result in results:
        config = result.config.get("train", {}) if result.config else {}
        metrics = result.metrics or {}
        trial_id = str(metrics.get("trial_id") or Path(result.path).name)
        final = cfg.files.trial(trial_id).final
        exported = is_model_dir(final)
        records.append(
            {
                "trial_id": trial_id,
                "design": TokenDesign(**config.get("design", {})).name,
                "searched": {key: get_dotted(config, key) for key in cfg.search_space},
                "dev_macro_f1": metrics.get("dev_macro_f1"),
                "dev_loss": metrics.get("dev_loss"),
                "initial_dev_macro_f1": metrics.get("initial_dev_macro_f1"),
                **{k: metrics[k] for k in dev_type_keys(metrics)},
                "epochs_done": metrics.get("training_iteration"),
                "checkpoint": metrics.get("checkpoint_path", ""),
                "final_model": str(final) if exported else "",
                "status": "error" if result.error else ("finished" if exported else "stopped"),
                "error": repr(result.error)[:2000] if result.error else "",
            }
        )
    sign = 1 if cfg.mode == "min" else -1
    known = [r for r in records if r[cfg.metric] is not None and not math.isnan(r[cfg.metric])]
    unknown = [r for r in records if r not in known]
    known.sort(key=lambda r: (sign * r[cfg.metric], r["trial_id"]))
    return known + sorted(unknown, key=lambda r: r["trial_id"])


def trials_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """The ranked trials as a table: each searched key a column of its own (lists and mappings shown as JSON)."""
    rows = []
    for record in records:
        shown = {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in record["searched"].items()}
        rows.append({"trial_id": record["trial_id"], "design": record["design"], **shown, **_outcome(record)})
    return pd.DataFrame(rows)


def _outcome(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("trial_id", "design", "searched")}


def summary(table: pd.DataFrame, cfg: SweepConfig) -> pd.DataFrame:
    """The ranked trials' columns a terminal shows: id, design, searched keys, dev metrics and status."""
    types = dev_type_keys(table.columns)
    shown = ["trial_id", "design", *cfg.search_space, "dev_macro_f1", *types, "initial_dev_macro_f1", "status"]
    return table[[c for c in dict.fromkeys(shown) if c in table.columns]]


def finished_best(cfg: SweepConfig) -> dict[str, Any] | None:
    """The best trial of this sweep if it finished with this config, else None (not finished). A finished sweep of
    another config, or one that saved no config to check, is refused."""
    files = cfg.files
    if not files.best.exists():
        return None
    if not files.config.exists():
        raise ConfigError(
            f"sweep {cfg.name}: {files.best} has no {files.config} to check it against; remove {files.dir} or "
            "choose another name"
        )
    _refuse_changed(cfg)
    return json.loads(files.best.read_text())


def _refuse_changed(cfg: SweepConfig) -> None:
    """A sweep resumes (or is reused) only with the config it was started with, as a training run is."""
    refuse_changed(cfg.files.config, SweepConfig, to_dict(cfg), SWEEP_RUNTIME_KEYS, f"sweep {cfg.name}", "name")


def sweep(cfg: SweepConfig, progress: TrainProgress | None = None) -> pd.DataFrame:
    """Run (or resume) the sweep; write trials.parquet and best.json; return the ranked trials. `progress` is
    called, as in `train`, with each trial's training reports (the run name is the trial id)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    files = cfg.files
    directory = files.dir
    if files.config.exists():
        _refuse_changed(cfg)
    connect(cfg.address, deepspeed_env(cfg.train.use_gpu))
    if directory.local:
        Path(directory.path).mkdir(parents=True, exist_ok=True)
    check_reachable({"runs_dir": str(directory)})  # Tune keeps its experiment there; each trial checks the rest
    # Tune runs trials in their own directories: resolve local paths here, on the driver. The trials are
    # tracked beside them, in experiment sweep-<name> unless one is set.
    tracking = replace(cfg.train.tracking, experiment=cfg.train.tracking.experiment or f"sweep-{cfg.name}")
    trials = replace(cfg.train, storage_path=str(files.trials_dir), tracking=tracking)
    resolved = replace(cfg, train=trials.resolved())
    create_experiment(resolved.train.tracking, "train")  # before trials, which run concurrently, open runs in it
    train_values = param_space(resolved)
    # Tune needs some resource in a trial's bundle: with no CPU, a token of memory.
    trainable = tune.with_resources(run_trial, {"CPU": cfg.trial_cpus, "memory": TRIAL_MEMORY})
    if tune.Tuner.can_restore(str(files.tune)):
        tuner = tune.Tuner.restore(
            str(files.tune),
            trainable=trainable,
            param_space=train_values,
            restart_errored=False,
            resume_unfinished=True,
        )
    else:
        files.config.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        scheduler = (
            ASHAScheduler(
                time_attr="training_iteration",
                grace_period=cfg.scheduler.grace_period,
                reduction_factor=cfg.scheduler.reduction_factor,
                max_t=cfg.train.epochs + 1,  # past the last epoch: never stop a trial before it exports
            )
            if cfg.scheduler.type == "asha"
            else FIFOScheduler()
        )
        tuner = tune.Tuner(
            trainable,
            param_space=train_values,
            tune_config=tune.TuneConfig(
                metric=cfg.metric,
                mode=cfg.mode,
                scheduler=scheduler,
                num_samples=cfg.num_samples,
                max_concurrent_trials=cfg.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(
                name=TUNE_EXPERIMENT,
                storage_path=str(directory),
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            ),
        )
    with watched(lambda: {name: files.trial(name).progress for name in files.trials_dir.dirs()}, progress):
        results = tuner.fit()
    records = _ranked_trials(results, cfg)
    table = trials_table(records)
    files.trials.write_parquet(table)
    finished = [r for r in records if r["status"] == "finished" and r[cfg.metric] is not None]
    if not finished:
        raise ConfigError(f"sweep {cfg.name}: no trial finished; see {files.trials}")
    files.best.write_text(json.dumps(finished[0], indent=2, default=str) + "\n")
    return table
