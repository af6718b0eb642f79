"""Where training runs and sweeps keep their files: the one owner of that layout.

A runs directory (`storage_path` of training, `runs_dir` of sweeps and evaluations; a local directory or an
object-store prefix) holds:

    <run name>/                      a training run
        train_config.yaml            the config it was started with (written once its data has been read)
        checkpoint_epoch*_step*/     Ray Train's checkpoints
        progress.json                rank 0's latest report: what the driver's bar shows
        run_record.json              what it ran with
        tracking.json                its tracking run's id: a resumed run continues that run
        rejects.jsonl, clean.jsonl   skipped bad rows and the good ones (with skip_bad_rows)
        final/                       the final Hugging Face model
        final_metrics.json           written last: the run is finished
    sweeps/<sweep name>/
        sweep_config.yaml            the config it was started with
        tune/                        Ray Tune's experiment (restored by a re-run)
        trials/<trial id>/           each trial: a training run as above
        trials.parquet, best.json    the ranked trials and the best finished one

`run:NAME` and `sweep:NAME:best` model references name a run's `final/` model and a sweep's best trial's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from harness.agents.references import is_model_dir, reference_problem
from harness.core.config import differing_keys
from harness.core.errors import ConfigError
from harness.core.names import check_name
from harness.core.storage import Location, location

CHECKPOINTS = "checkpoint_*"
CONFIG_NAME = "train_config.yaml"  # in a run directory, and in every model directory training saves
TUNE_EXPERIMENT = "tune"  # Ray Tune's experiment, under a sweep's directory


@dataclass(frozen=True)
class RunFiles:
    """The files of one training run."""

    dir: Location

    @property
    def config(self) -> Location:
        return self.dir.child(CONFIG_NAME)

    @property
    def progress(self) -> Location:
        return self.dir.child("progress.json")

    @property
    def record(self) -> Location:
        return self.dir.child("run_record.json")

    @property
    def tracking(self) -> Location:
        return self.dir.child("tracking.json")

    @property
    def final(self) -> Location:
        return self.dir.child("final")

    @property
    def final_metrics(self) -> Location:
        return self.dir.child("final_metrics.json")

    @property
    def finished(self) -> bool:
        return is_model_dir(self.final) and self.final_metrics.exists()

    @property
    def started(self) -> bool:
        """Whether the run holds a model or checkpoints."""
        return is_model_dir(self.final) or self.dir.has_dir(CHECKPOINTS)


def run_files(runs_dir: str | Path, name: str) -> RunFiles:
    return RunFiles(location(runs_dir, "storage_path").child(check_name(name, "run name")))


@dataclass(frozen=True)
class SweepFiles:
    """The files of one sweep."""

    dir: Location

    @property
    def config(self) -> Location:
        return self.dir.child("sweep_config.yaml")

    @property
    def tune(self) -> Location:
        return self.dir.child(TUNE_EXPERIMENT)

    @property
    def trials_dir(self) -> Location:
        return self.dir.child("trials")

    def trial(self, trial_id: str) -> RunFiles:
        return RunFiles(self.trials_dir.child(trial_id))

    @property
    def trials(self) -> Location:
        return self.dir.child("trials.parquet")

    @property
    def best(self) -> Location:
        return self.dir.child("best.json")


def sweep_files(runs_dir: str | Path, name: str) -> SweepFiles:
    return SweepFiles(location(runs_dir, "runs_dir").child("sweeps").child(check_name(name, "sweep name")))


def refuse_changed(
    saved: Location, cls: type, current: dict[str, Any], runtime: tuple[str, ...], what: str, rename: str
) -> None:
    """Refuse to resume or reuse `what` (`run NAME`, `sweep NAME`) when the config it saved in `saved` differs from
    `current` in a key that is not one of `runtime` (how it runs, not what it makes). `rename` is the key that
    chooses another one."""
    differ = differing_keys(cls, yaml.safe_load(saved.read_text()) or {}, current, runtime)
    if differ:
        raise ConfigError(
            f"{what}: {saved} was made with another config ({', '.join(differ)} differ); "
            f"choose another {rename}, or restore those values to resume or reuse it"
        )


def trained_model(reference: str, runs_dir: str | Path) -> str | None:
    """What a `run:NAME` or `sweep:NAME:best` reference names, as a loadable path (names never leave `runs_dir`);
    None for any other reference."""
    problem = reference_problem(reference)
    if problem:
        raise ConfigError(f"model {reference}: {problem}")
    if reference.startswith("run:"):
        final = run_files(runs_dir, reference[4:]).final
        if not is_model_dir(final):
            raise ConfigError(f"model {reference}: no finished training run at {final}")
        return str(final)
    if reference.startswith("sweep:"):
        sweep = sweep_files(runs_dir, reference.split(":")[1])
        if not sweep.best.exists():
            raise ConfigError(f"model {reference}: no finished sweep at {sweep.dir}")
        return str(json.loads(sweep.best.read_text())["final_model"])
    return None
