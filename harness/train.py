"""BehaviorSFT (and the standard SFT baseline) as a Ray Train `TorchTrainer` over DeepSpeed.

The driver validates the config and data, tokenizes with Ray Data, and starts the trainer; each
worker runs `train_loop_per_worker`: build the model, apply the token design, wrap LoRA, call
`deepspeed.initialize`, train on its Ray Data shard, and report metrics and checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from harness.bench.io import load_dataset
from harness.bench.taxonomy import Taxonomy, load_taxonomy
from harness.config import build, to_dict
from harness.errors import ConfigError
from harness.files import write_text
from harness.model import LoraSettings, ModelSettings, load_model, load_tokenizer, local_or_hub, wrap_lora
from harness.names import name_problem
from harness.prompts import encode_example, target_text
from harness.selection import DEFAULT_STRATEGY, Mode, Selector, Strategy, agent_prompt, encode_prompt, parse_mode
from harness.tokens import TokenDesign

if TYPE_CHECKING:
    import torch

TRAIN_MODES = (Mode.BEHAVIORSFT, Mode.SFT)
# Keys that change how a run executes or where it is kept, not what it learns: a finished run is reused
# when every other key matches.
RUNTIME_KEYS = ("storage_path", "max_failures", "keep_checkpoints", "log_every", "resources_per_worker")
CONFIG_FILE = "train_config.yaml"
BUCKET_BATCHES = 16  # length-bucketing window, in batches
# CPU share of each data-preparation task and actor: light work, and concurrent sweep trials
# must not deadlock with each one holding a whole core for its read while waiting for its encoder.
PREP_CPUS = 0.25


@dataclass
class DeepSpeedSettings:
    zero_stage: int = 2
    offload_optimizer: str | None = None  # "cpu" or "nvme" (ZeRO-Offload)
    offload_param: str | None = None  # "cpu" or "nvme" (ZeRO-3 only)
    config: dict[str, Any] = field(default_factory=dict)  # raw DeepSpeed keys, merged last


@dataclass
class TrainConfig:
    run_name: str = "behaviorsft-tiny"
    mode: Mode = Mode.BEHAVIORSFT
    data: str = "artifacts/data/tasks.jsonl"
    taxonomy: str | None = None
    skip_bad_rows: bool = False
    model: ModelSettings = field(default_factory=ModelSettings)
    design: TokenDesign = field(default_factory=TokenDesign)
    lora: LoraSettings = field(default_factory=LoraSettings)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    epochs: int = 3
    batch_size: int = 8  # per worker, per micro-step
    gradient_accumulation: int = 1
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    behavior_loss_weight: float = 1.0  # loss weight of each answer's first token (the behavior token); 1: plain mean
    max_length: int = 512
    max_train_tasks: int | None = None
    eval_max_tasks: int = 256
    log_every: int = 10
    checkpoint_every: int = 0  # micro-steps between checkpoints; 0: at the end of each epoch
    keep_checkpoints: int = 2
    seed: int = 0
    num_workers: int = 2
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1})
    storage_path: str = "artifacts/runs"
    max_failures: int = 1

    def __post_init__(self) -> None:
        problem = name_problem(self.run_name)
        if problem:
            raise ValueError(f"run_name: {problem}")
        self.mode = parse_mode(self.mode, "mode")
        if self.mode not in TRAIN_MODES:
            raise ValueError(f"mode: {self.mode.value!r} is not one of {[m.value for m in TRAIN_MODES]}")
        if self.deepspeed.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage: {self.deepspeed.zero_stage} is not 0, 1, 2 or 3")
        for name in ("epochs", "batch_size", "gradient_accumulation", "num_workers", "max_length", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1")
        if self.behavior_loss_weight <= 0:
            raise ValueError(f"behavior_loss_weight: must be > 0, got {self.behavior_loss_weight}")

    def resolved(self) -> TrainConfig:
        """This config with local paths made absolute (Ray workers run in another directory)."""
        return replace(
            self,
            data=str(Path(self.data).resolve()),
            taxonomy=str(Path(self.taxonomy).resolve()) if self.taxonomy else None,
            storage_path=str(Path(self.storage_path).resolve()),
            model=replace(self.model, name_or_path=local_or_hub(self.model.name_or_path)),
        )

    @property
    def run_dir(self) -> Path:
        return Path(self.storage_path).resolve() / self.run_name


@dataclass
class TrainResult:
    run_dir: Path
    final_model: Path
    metrics: dict[str, Any]


def deepspeed_config(cfg: TrainConfig, world_size: int, total_steps: int) -> dict[str, Any]:
    """The DeepSpeed config: ZeRO stage and offload, AdamW, warmup-decay schedule, bf16 on GPU."""
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": cfg.deepspeed.offload_optimizer}
    if cfg.deepspeed.offload_param:
        zero["offload_param"] = {"device": cfg.deepspeed.offload_param}
    warmup = max(1, int(cfg.warmup_ratio * total_steps))
    config = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation,
        "train_batch_size": cfg.batch_size * cfg.gradient_accumulation * world_size,
        "gradient_clipping": 1.0,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": cfg.learning_rate, "weight_decay": cfg.weight_decay, "torch_adam": True},
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": cfg.learning_rate,
                "warmup_num_steps": warmup,
                "total_num_steps": max(total_steps, warmup + 1),
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.use_gpu and cfg.model.dtype in ("auto", "bfloat16")},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed.offload_optimizer:
        config["zero_force_ds_cpu_optimizer"] = False
    config.update(cfg.deepspeed.config)
    return config


def batches_per_epoch(rows_per_worker: int, batch_size: int) -> int:
    """Micro-batches one worker sees per epoch with length bucketing (see `bucketed_batches`)."""
    window = batch_size * BUCKET_BATCHES
    full, rest = divmod(rows_per_worker, window)
    return full * BUCKET_BATCHES + math.ceil(rest / batch_size)


def pad_batch(examples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-padded input_ids, attention_mask and labels (-100 on padding) for encoded examples."""
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


def bucketed_batches(shard, batch_size: int, pad_id: int, seed: int):
    """Padded batches from a Ray Data shard: sort a window of rows by length, shuffle the batches."""
    import numpy as np

    rng = random.Random(seed)
    for window in shard.iter_batches(batch_size=batch_size * BUCKET_BATCHES, batch_format="numpy"):
        order = np.argsort([len(x) for x in window["input_ids"]], kind="stable")
        groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        rng.shuffle(groups)
        for group in groups:
            yield pad_batch([{k: window[k][i] for k in ("input_ids", "labels")} for i in group], pad_id)


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, first_weight: float) -> torch.Tensor:
    """Next-token cross-entropy over the labelled positions, each answer's first token weighted `first_weight`
    (with 1.0 it equals the model's own mean loss)."""
    import torch.nn.functional as F

    targets = labels[:, 1:]
    losses = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    ).view_as(targets)
    learned = targets != -100
    first = learned & (learned.cumsum(1) == 1)
    weights = learned.float() + first.float() * (first_weight - 1)
    return (losses * weights).sum() / weights.sum()


class Encode:
    """Ray Data callable: task rows -> tokenized training examples (prompt masked) or eval prompts."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = build(TrainConfig, cfg)
        self.taxonomy = load_taxonomy(self.cfg.taxonomy)
        self.tokenizer = load_tokenizer(self.cfg.model.name_or_path, self.cfg.model.trust_remote_code)
        self.cfg.design.add_to_tokenizer(self.tokenizer, self.taxonomy)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        cfg, out = self.cfg, {"input_ids": [], "labels": [], "prompt_ids": [], "gold_behavior": []}
        design = cfg.design if cfg.mode is Mode.BEHAVIORSFT else None
        strategy = DEFAULT_STRATEGY[cfg.mode]
        for i in range(len(batch["task_id"])):
            row = {k: batch[k][i] for k in ("messages", "category", "gold_behavior", "reference")}
            prompt = agent_prompt(self.tokenizer, list(row["messages"]), cfg.mode, strategy, design, self.taxonomy)
            example = encode_example(self.tokenizer, prompt, target_text(row, design, self.taxonomy), cfg.max_length)
            out["input_ids"].append(example["input_ids"])
            out["labels"].append(example["labels"])
            out["prompt_ids"].append(encode_prompt(self.tokenizer, prompt, cfg.max_length))  # as evaluation encodes
            out["gold_behavior"].append(row["gold_behavior"])
        return out


def init_ray(use_gpu: bool) -> None:
    """Join the cluster (or start a local one) unless connected; CPU workers get DeepSpeed's CPU accelerator."""
    import ray

    if not ray.is_initialized():
        ray.init(runtime_env=None if use_gpu else {"env_vars": {"DS_ACCELERATOR": "cpu"}})


def _sync_devices(use_gpu: bool) -> None:
    # DeepSpeed picks its accelerator at import time; on CPU workers it must be told.
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _gathered(model, stage: int):
    import deepspeed

    return (
        deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None) if stage == 3 else nullcontext()
    )


def _save_model(model, tokenizer, cfg: TrainConfig, out: Path, merge: bool) -> None:
    """A loadable Hugging Face directory: weights (or the LoRA adapter), tokenizer, design, config."""
    to_save = model.merge_and_unload() if merge else model
    to_save.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    cfg.design.save(out)
    (out / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def evaluate_dev(module, tokenizer, cfg: TrainConfig, taxonomy: Taxonomy, dev: list[dict]) -> dict[str, float]:
    """Dev loss and, for BehaviorSFT, Macro F1 of behavior selection, selected as evaluation selects."""
    import torch

    from harness.metrics import macro_f1

    device = next(module.parameters()).device
    losses, gold, pred = [], [], []
    selecting = cfg.mode is Mode.BEHAVIORSFT  # standard SFT has no behavior tokens: dev loss only
    selector = (
        Selector(module, tokenizer, taxonomy, cfg.mode, Strategy.BEHAVIOR_TOKEN, cfg.design) if selecting else None
    )
    module.eval()
    with torch.no_grad():
        for start in range(0, len(dev), cfg.batch_size):
            chunk = dev[start : start + cfg.batch_size]
            batch = pad_batch(chunk, tokenizer.pad_token_id)
            losses.append(module(**{k: v.to(device) for k, v in batch.items()}).loss.float().item())
            if selector is not None:
                pred += [s.behavior for s in selector.select([list(r["prompt_ids"]) for r in chunk])]
                gold += [r["gold_behavior"] for r in chunk]
    module.train()
    metrics = {"dev_loss": sum(losses) / max(len(losses), 1)}
    if gold:
        metrics["dev_macro_f1"] = macro_f1(gold, pred)
    return metrics


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: DeepSpeed BehaviorSFT/SFT on this worker's shard, with resume."""
    cfg = build(TrainConfig, config["train"])
    _sync_devices(cfg.use_gpu)
    import deepspeed
    import ray.train
    import torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.seed)
    if not cfg.use_gpu:
        torch.set_num_threads(max(1, int(cfg.resources_per_worker.get("CPU", 1))))
    taxonomy = load_taxonomy(cfg.taxonomy)
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    model = load_model(cfg.model, cfg.use_gpu)
    new_rows = cfg.design.apply(tokenizer, model, taxonomy) if cfg.mode is Mode.BEHAVIORSFT else []
    model.config.use_cache = False
    if cfg.lora.enabled:
        model = wrap_lora(model, cfg.lora, new_rows)
    steps_per_epoch = config["steps_per_epoch"]
    total_steps = steps_per_epoch * cfg.epochs // cfg.gradient_accumulation
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(cfg, world, total_steps),
    )
    state: dict[str, Any] = {"epoch": 0, "batch_in_epoch": 0, "global_step": 0, "initial": {}}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            _, client = engine.load_checkpoint(
                str(Path(directory) / "deepspeed"), tag="state", load_module_strict=not cfg.lora.enabled
            )
        state.update({k: client[k] for k in state})
        if rank == 0:
            print(f"[harness] resuming {cfg.run_name} at epoch {state['epoch']} step {state['global_step']}")
    dev = list(ray.train.get_dataset_shard("dev").iter_rows())[: cfg.eval_max_tasks]
    shard = ray.train.get_dataset_shard("train")
    if not state["initial"]:  # the untrained model's dev metrics, the baseline of this run
        initial = evaluate_dev(engine.module, tokenizer, cfg, taxonomy, dev)
        state["initial"] = {f"initial_{k}": v for k, v in initial.items()}
    # Every report carries the latest dev metrics, so schedulers (Tune's ASHA) always see them.
    latest_dev = {k.removeprefix("initial_"): v for k, v in state["initial"].items()}

    def save(metrics: dict[str, Any], final: bool) -> None:
        latest_dev.update(evaluate_dev(engine.module, tokenizer, cfg, taxonomy, dev))
        metrics = {**metrics, **state["initial"], **latest_dev}
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(
                str(Path(tmp) / "deepspeed"),
                tag="state",
                client_state=dict(state),
                exclude_frozen_parameters=cfg.lora.enabled,
            )
            with _gathered(engine.module, cfg.deepspeed.zero_stage):
                if rank == 0:
                    _save_model(engine.module, tokenizer, cfg, Path(tmp) / "model", merge=False)
                    if final and cfg.lora.enabled:
                        _save_model(engine.module, tokenizer, cfg, Path(tmp) / "merged", merge=True)
            name = f"checkpoint_epoch{state['epoch']:03d}_step{state['global_step']:07d}"
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)

    window_loss, window_tokens, window_start = [], 0, time.perf_counter()
    metrics: dict[str, Any] = {}
    for epoch in range(state["epoch"], cfg.epochs):
        state["epoch"] = epoch
        skip = state["batch_in_epoch"]
        for index, batch in enumerate(
            bucketed_batches(shard, cfg.batch_size, tokenizer.pad_token_id, cfg.seed + epoch)
        ):
            if index < skip:
                continue
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            if cfg.behavior_loss_weight == 1.0:
                loss = engine(**batch).loss
            else:
                logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = weighted_loss(logits, batch["labels"], cfg.behavior_loss_weight)
            engine.backward(loss)
            engine.step()
            state["batch_in_epoch"] = index + 1
            state["global_step"] += 1
            window_loss.append(loss.float().item())
            window_tokens += int(batch["attention_mask"].sum())
            last = state["batch_in_epoch"] == steps_per_epoch and epoch == cfg.epochs - 1
            checkpoint_now = bool(cfg.checkpoint_every) and state["global_step"] % cfg.checkpoint_every == 0
            checkpoint_now = checkpoint_now and not last  # the last step's checkpoint is the final one
            if state["global_step"] % cfg.log_every == 0 or last:
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "loss": sum(window_loss) / len(window_loss),
                    "tokens_per_s": window_tokens * world / elapsed,
                    "learning_rate": scheduler.get_last_lr()[0],
                    "epoch": epoch,
                    "step": state["global_step"],
                }
                window_loss, window_tokens, window_start = [], 0, time.perf_counter()
                if not checkpoint_now and not last:  # a checkpoint's report carries these metrics
                    ray.train.report({**metrics, **latest_dev})
            if checkpoint_now:
                save(metrics, final=False)
        state["batch_in_epoch"] = 0
        if epoch == cfg.epochs - 1:
            state["epoch"] = cfg.epochs
            save({**metrics, "completed": True}, final=True)  # not "done": Tune reserves it
        elif not cfg.checkpoint_every:
            state["epoch"] = epoch + 1
            save(metrics, final=False)


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value and key != "resources_per_worker":
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _differing_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between a run's saved config and `current`, runtime keys aside."""
    old, new = _flat(saved), _flat(current)
    return sorted(k for k in old.keys() | new.keys() if k not in RUNTIME_KEYS and old.get(k) != new.get(k))


def prepare_datasets(cfg: TrainConfig) -> tuple[dict[str, Any], int]:
    """Validated, tokenized train and dev datasets (materialized) and the train row count."""
    from ray.data import ActorPoolStrategy

    tasks = load_dataset(
        cfg.data,
        load_taxonomy(cfg.taxonomy),
        skip_bad_rows=cfg.skip_bad_rows,
        rejects_path=cfg.run_dir / "rejects.jsonl",
        clean_dir=cfg.run_dir,
        num_cpus=PREP_CPUS,
    )
    encode = {
        "fn_constructor_kwargs": {"cfg": to_dict(cfg)},
        "compute": ActorPoolStrategy(size=1),
        "batch_size": 64,
        "num_cpus": PREP_CPUS,
    }
    train = tasks.filter(lambda row: row["split"] == "train", num_cpus=PREP_CPUS)
    if cfg.max_train_tasks:
        train = train.limit(cfg.max_train_tasks)
    dev = tasks.filter(lambda row: row["split"] == "dev", num_cpus=PREP_CPUS).limit(cfg.eval_max_tasks)
    train = train.map_batches(Encode, **encode).materialize()
    dev = dev.map_batches(Encode, **encode).materialize()
    rows = train.count()
    if rows < cfg.num_workers:
        raise ConfigError(f"{cfg.data}: {rows} train task(s) for {cfg.num_workers} workers")
    return {"train": train, "dev": dev}, rows


def train(cfg: TrainConfig, callbacks: list | None = None) -> TrainResult:
    """Run (or resume) a training run; return where its final Hugging Face model is.

    `callbacks` go to the run's `RunConfig` (a sweep passes Tune's report callback).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = cfg.resolved()
    final, metrics_file, saved = cfg.run_dir / "final", cfg.run_dir / "final_metrics.json", cfg.run_dir / CONFIG_FILE
    progressed = (final / "config.json").exists() or any(cfg.run_dir.glob("checkpoint_*"))
    if saved.exists() and progressed:
        differ = _differing_keys(yaml.safe_load(saved.read_text()), to_dict(cfg))
        if differ:
            raise ConfigError(
                f"run {cfg.run_name}: {saved} was made with another config ({', '.join(differ)} differ); "
                "choose another run_name, or restore those values to resume or reuse it"
            )
    if (final / "config.json").exists() and metrics_file.exists():
        print(f"[harness] run {cfg.run_name} already finished: reusing {final} (delete {cfg.run_dir} to retrain)")
        return TrainResult(cfg.run_dir, final, json.loads(metrics_file.read_text()))
    init_ray(cfg.use_gpu)
    write_text(saved, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    datasets, rows = prepare_datasets(cfg)
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
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as directory:
        source = Path(directory) / ("merged" if cfg.lora.enabled else "model")
        tmp = final.with_name("final.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
    metrics = dict(result.metrics or {})
    write_text(metrics_file, json.dumps(metrics, indent=2, default=str) + "\n")
    return TrainResult(cfg.run_dir, final, metrics)
