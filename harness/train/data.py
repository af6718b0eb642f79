"""Training data: validated tasks tokenized with Ray Data, and length-bucketed padded batches of a worker's shard."""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

from harness.agents.encoding import encode_example, encode_prompt
from harness.agents.loading import load_tokenizer
from harness.agents.prompts import target
from harness.agents.references import local_copy
from harness.agents.selection import DEFAULT_STRATEGY, Mode, agent_prompt
from harness.core.config import build, to_dict
from harness.core.errors import ConfigError
from harness.data.io import PREP_CPUS, load_dataset
from harness.data.taxonomy import load_taxonomy
from harness.train.config import TrainConfig

BUCKET_BATCHES = 16  # length-bucketing window, in batches


class Encode:
    """Task rows -> tokenized training examples (prompt masked) or eval prompts, for one config."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = build(TrainConfig, cfg)
        self.taxonomy = load_taxonomy(self.cfg.taxonomy)
        self.tokenizer = load_tokenizer(local_copy(self.cfg.model.name_or_path), self.cfg.model.trust_remote_code)
        self.cfg.design.add_to_tokenizer(self.tokenizer, self.taxonomy)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        columns = ("task_id", "input_ids", "labels", "prompt_ids", "gold_behavior", "task_type", "split")
        cfg, out = self.cfg, {column: [] for column in columns}
        design = cfg.design if cfg.mode is Mode.BEHAVIORSFT else None
        strategy = DEFAULT_STRATEGY[cfg.mode]
        for i in range(len(batch["task_id"])):
            row = {k: batch[k][i] for k in ("messages", "category", "gold_behavior", "reference")}
            prompt = agent_prompt(self.tokenizer, list(row["messages"]), cfg.mode, strategy, design, self.taxonomy)
            answer = target(self.tokenizer, row, design, self.taxonomy)
            example = encode_example(self.tokenizer, prompt, answer, cfg.max_length)
            out["input_ids"].append(example["input_ids"])
            out["labels"].append(example["labels"])
            out["prompt_ids"].append(encode_prompt(self.tokenizer, prompt, cfg.max_length))  # as evaluation encodes
            out["gold_behavior"].append(row["gold_behavior"])
            out["task_type"].append(batch["task_type"][i])
            out["split"].append(batch["split"][i])
            out["task_id"].append(batch["task_id"][i])
        return out


_encoders: list[tuple[dict[str, Any], Encode]] = []  # this worker process's latest encoder, with its config


def encode_batch(batch: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """Ray Data task: `Encode` a batch with this process's encoder for `cfg`, made on its first batch. Ray reuses a
    job's worker processes for its tasks, so a later run of the job (a sweep's next trial, the demo's second
    training) finds torch and transformers imported already; a new actor would import them again."""
    if not _encoders or _encoders[0][0] != cfg:
        _encoders[:] = [(cfg, Encode(cfg))]
    return _encoders[0][1](batch)


def prepare_datasets(cfg: TrainConfig) -> tuple[dict[str, Any], int]:
    """Validated, tokenized train and dev datasets (materialized) and the train row count."""
    from ray.data.expressions import col

    encode = {"fn_kwargs": {"cfg": to_dict(cfg)}, "batch_size": 64, "num_cpus": PREP_CPUS, "concurrency": 1}
    with cfg.files.dir.local_dir() as scratch:  # the rejects and clean copy of skipped bad rows land in the run
        tasks = load_dataset(
            cfg.data,
            load_taxonomy(cfg.taxonomy),
            skip_bad_rows=cfg.skip_bad_rows,
            rejects_path=scratch / "rejects.jsonl",
            clean_dir=scratch,
        )
        train = tasks.filter(expr=col("split") == "train", num_cpus=PREP_CPUS)
        if cfg.max_train_tasks:
            train = train.limit(cfg.max_train_tasks)
        if cfg.balance_by:
            train = balanced(train.materialize(), cfg.balance_by, cfg.seed)
        dev = tasks.filter(expr=col("split") == "dev", num_cpus=PREP_CPUS).limit(cfg.eval_max_tasks)
        # One pass, one batch at a time: a process's first batch imports torch and transformers, most of this
        # step's time on a small run.
        encoded = train.union(dev).map_batches(encode_batch, **encode).materialize()
    train, dev = (
        encoded.filter(expr=col("split") == split, num_cpus=PREP_CPUS).materialize() for split in ("train", "dev")
    )
    rows = train.count()
    if rows < cfg.num_workers:
        raise ConfigError(f"{cfg.data}: {rows} train task(s) for {cfg.num_workers} workers")
    for dataset in (train, dev):  # read in the workers: the driver shows the run's own bar, and Ray Data's bars of
        dataset.context.enable_progress_bars = False  # the workers' reads would reach its terminal after it ended
    return {"train": train, "dev": dev}, rows


def balanced(tasks: Any, column: str, seed: int) -> Any:
    """`tasks` (a materialized Ray Dataset) with the tasks of each value of `column` repeated until every value is
    about as frequent as the most frequent one: each task `most / count` times, the fraction drawn by a hash of its
    id and `seed` (the same tasks on every run)."""
    counts: Counter = Counter()  # read from the materialized blocks: no shuffle, which a Tune trial could not run
    for batch in tasks.iter_batches(batch_size=None, batch_format="pyarrow"):
        counts.update(batch.column(column).to_pylist())
    most = max(counts.values())
    factors = {value: most / count for value, count in counts.items()}
    kwargs = {"column": column, "factors": factors, "seed": seed}
    return tasks.flat_map(_repeat, fn_kwargs=kwargs, num_cpus=PREP_CPUS)


def _repeat(row: dict[str, Any], column: str, factors: dict[str, float], seed: int) -> list[dict[str, Any]]:
    factor = factors[row[column]]
    draw = int(hashlib.sha256(f"{seed}:{row['task_id']}".encode()).hexdigest()[:8], 16) / 2**32
    return [row] * (int(factor) + (draw < factor - int(factor)))


def batches_per_epoch(rows_per_worker: int, batch_size: int) -> int:
    """Micro-batches one worker sees per epoch with length bucketing (see `bucketed_batches`)."""
    window = batch_size * BUCKET_BATCHES
    full, rest = divmod(rows_per_worker, window)
    return full * BUCKET_BATCHES + math.ceil(rest / batch_size)


def pad_batch(examples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-padded input_ids, attention_mask and labels (-100 on padding) for encoded examples (tensors)."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.as_tensor(example["input_ids"])
        labels[row, :n] = torch.as_tensor(example["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def bucketed_batches(shard: Any, batch_size: int, pad_id: int, seed: int) -> Iterator[tuple[dict[str, Any], list[str]]]:
    """Padded batches from a Ray Data shard, with their rows' task ids: sort a window of rows by length, shuffle the
    batches."""
    import numpy as np

    rng = random.Random(seed)
    for window in shard.iter_batches(batch_size=batch_size * BUCKET_BATCHES, batch_format="numpy"):
        order = np.argsort([len(x) for x in window["input_ids"]], kind="stable")
        groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        rng.shuffle(groups)
        for group in groups:
            batch = pad_batch([{k: window[k][i] for k in ("input_ids", "labels")} for i in group], pad_id)
            yield batch, [str(window["task_id"][i]) for i in group]
