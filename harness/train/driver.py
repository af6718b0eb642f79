"""The training driver: `train` validates the config and data, tokenizes with Ray Data (`harness.train.data`) and
runs a Ray Train `TorchTrainer` over DeepSpeed whose workers run `harness.train.recipe`; a re-run resumes or reuses
the run (`harness.train.layout`)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from harness.agents.selection import Mode
from harness.core.cluster import check_reachable, connect
from harness.core.config import to_dict
from harness.core.errors import ConfigError
from harness.core.storage import Location
from harness.train.config import RUNTIME_KEYS, TrainConfig
from harness.train.data import batches_per_epoch, prepare_datasets
from harness.train.layout import CONFIG_NAME, refuse_changed
from harness.train.recipe import deepspeed_env, train_loop_per_worker

# A training progress callback: run name, optimizer steps done, steps in the run, the latest reported metrics.
TrainProgress = Callable[[str, int, int, dict[str, float]], None]


@dataclass
class TrainResult:
    run_dir: Location
    final_model: Location
    metrics: dict[str, Any]


@contextmanager
def watched(progress_files: Callable[[], dict[str, Location]], progress: TrainProgress | None) -> Iterator[None]:
    """While the block runs, call `progress` with each new report in the progress files of the runs that
    `progress_files` lists (by run name; rank 0 of each run writes its file)."""
    if progress is None:
        yield
        return
    done, seen = threading.Event(), dict[str, int]()

    def poll() -> None:
        # A failed listing or read (storage unreachable a moment, a file deleted as a run restarts) skips this
        # look: progress is for display and never stops the work it watches.
        try:
            files = progress_files()
        except OSError:
            return
        for name, progress_file in files.items():
            try:
                changed = progress_file.mtime_ns()
                if changed is not None and changed != seen.get(name):
                    report = json.loads(progress_file.read_text())
                    progress(name, report["step"], report["total"], report["metrics"])
                    seen[name] = changed
            except (OSError, ValueError, KeyError):
                continue

    def watch() -> None:
        while not done.wait(2.0):
            poll()

    watcher = threading.Thread(target=watch, name="progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        seen.clear()  # the final reports, also one written in the same second as the last seen (S3 times)
        poll()


def train(cfg: TrainConfig, callbacks: list | None = None, progress: TrainProgress | None = None) -> TrainResult:
    """Run (or resume) a training run; return where its final Hugging Face model is.

    `callbacks` go to the run's `RunConfig` (a sweep passes Tune's report callback); `progress` is called on
    the driver with each report of rank 0 (read from the run directory, so on a cluster it needs the shared
    storage that `storage_path` must be there anyway).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = cfg.resolved()
    files = cfg.files
    if files.started and not files.config.exists():
        raise ConfigError(
            f"run {cfg.run_name}: {files.dir} holds a model or checkpoints but no {CONFIG_NAME}, so whether it was "
            f"made with this config is unknown; choose another run_name, or delete {files.dir} to retrain"
        )
    if files.started:
        refuse_changed(files.config, TrainConfig, to_dict(cfg), RUNTIME_KEYS, f"run {cfg.run_name}", "run_name")
    if files.finished:
        print(f"[harness] run {cfg.run_name} already finished: reusing {files.final} (delete {files.dir} to retrain)")
        return TrainResult(files.dir, files.final, json.loads(files.final_metrics.read_text()))
    connect(cfg.address, deepspeed_env(cfg.use_gpu))
    reads = {"data": cfg.data, "taxonomy": cfg.taxonomy, "model.name_or_path": cfg.model.name_or_path}
    check_reachable({"storage_path": cfg.storage_path, **reads})
    datasets, rows = prepare_datasets(cfg)
    files.config.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))  # the data is good: the run begins
    steps_per_epoch = batches_per_epoch(rows // cfg.num_workers, cfg.batch_size)
    score = ("dev_macro_f1", "max") if cfg.mode is Mode.BEHAVIORSFT else ("dev_loss", "min")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": to_dict(cfg), "steps_per_epoch": steps_per_epoch},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=dict(cfg.resources_per_worker)
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=cfg.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute=score[0], checkpoint_score_order=score[1]
            ),
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.max_failures, max_preemption_failures=cfg.max_preemption_failures
            ),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    files.progress.delete()  # an earlier attempt's last report is not this one's progress
    with watched(lambda: {cfg.run_name: files.progress}, progress):
        result = trainer.fit()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as directory:
        files.final.put_dir(Path(directory) / ("merged" if cfg.lora.enabled else "model"))
    metrics = dict(result.metrics or {})
    files.final_metrics.write_text(json.dumps(metrics, indent=2, default=str) + "\n")  # last: marks the run finished
    return TrainResult(files.dir, files.final, metrics)
