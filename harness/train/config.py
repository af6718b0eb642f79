"""The training config: `TrainConfig` with its DeepSpeed and tracking sections, and the DeepSpeed config it makes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from harness.agents.loading import DTYPES
from harness.agents.references import TINY_MODEL, local_or_hub, reference_problem
from harness.agents.selection import Mode, parse_mode
from harness.agents.tokens import TokenDesign
from harness.core import storage
from harness.core.config import check_range
from harness.core.names import name_problem
from harness.results.tracking import TrackingSettings
from harness.train.layout import RunFiles, run_files

TRAIN_MODES = (Mode.BEHAVIORSFT, Mode.SFT)
BALANCE_BY = ("gold_behavior", "task_type")
# Sections and keys that change how a run executes, where it is kept or where it is tracked, not what it
# learns: a finished run is reused when every other key matches.
RUNTIME_KEYS = (
    "address",
    "cache_frozen_layers",
    "storage_path",
    "max_failures",
    "max_preemption_failures",
    "keep_checkpoints",
    "log_every",
    "resources_per_worker",
    "tracking",
)


@dataclass
class ModelSettings:
    """Which model to load and how."""

    name_or_path: str = TINY_MODEL
    dtype: str = "auto"  # one of harness.agents.loading.DTYPES
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {list(DTYPES)}")
        problem = reference_problem(self.name_or_path)
        if problem:
            raise ValueError(f"name_or_path: {self.name_or_path}: {problem}")


@dataclass
class LoraSettings:
    enabled: bool = False
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    layers: int | None = None  # LoRA on the top N decoder layers only (peft's layers_to_transform); None: on all
    train_new_tokens: bool = True  # the design's new token rows train too (peft's trainable_token_indices)

    def __post_init__(self) -> None:
        if self.layers is not None:
            check_range("layers", self.layers, low=1)
        check_range("r", self.r, low=1)
        check_range("alpha", self.alpha, above=0)
        check_range("dropout", self.dropout, low=0, below=1)


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
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
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
    max_failures: int = 1  # worker errors to restart from the last checkpoint after; -1: any number
    max_preemption_failures: int = -1  # node preemptions (spot reclaims) to restart after, counted apart; -1: any
    address: str | None = None  # the Ray cluster (HOST:PORT); None: $RAY_ADDRESS, else a local cluster
    # Run the frozen layers below LoRA's top `lora.layers` once per task and reuse their output every later step
    # and epoch (harness.train.frozen): the same training, at the cost of the top layers.
    cache_frozen_layers: bool = False
    # Repeat tasks so that each value of this column is about equally frequent in every epoch: gold_behavior
    # (reactive, proactive) or task_type (reactive, proactive, restraint); None: the data as it is.
    balance_by: str | None = None

    def __post_init__(self) -> None:
        problem = name_problem(self.run_name)
        if problem:
            raise ValueError(f"run_name: {problem}")
        self.mode = parse_mode(self.mode, "mode")
        if self.mode not in TRAIN_MODES:
            raise ValueError(f"mode: {self.mode.value!r} is not one of {[m.value for m in TRAIN_MODES]}")
        if self.deepspeed.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage: {self.deepspeed.zero_stage} is not 0, 1, 2 or 3")
        for name in (
            "epochs",
            "batch_size",
            "gradient_accumulation",
            "num_workers",
            "max_length",
            "log_every",
            "eval_max_tasks",
            "keep_checkpoints",
        ):
            check_range(name, getattr(self, name), low=1)
        if self.max_train_tasks is not None:
            check_range("max_train_tasks", self.max_train_tasks, low=1)
        check_range("learning_rate", self.learning_rate, above=0)
        check_range("weight_decay", self.weight_decay, low=0)
        check_range("warmup_ratio", self.warmup_ratio, low=0, below=1)
        check_range("behavior_loss_weight", self.behavior_loss_weight, above=0)
        check_range("checkpoint_every", self.checkpoint_every, low=0)
        check_range("max_failures", self.max_failures, low=-1)
        check_range("max_preemption_failures", self.max_preemption_failures, low=-1)
        if self.balance_by not in (None, *BALANCE_BY):
            raise ValueError(f"balance_by: {self.balance_by!r} is not one of {list(BALANCE_BY)} or null")
        if self.cache_frozen_layers:
            needs = {
                "lora.enabled": self.lora.enabled,
                "lora.layers": self.lora.layers is not None,
                "lora.train_new_tokens: false": not self.lora.train_new_tokens,
                "deepspeed.zero_stage 0, 1 or 2": self.deepspeed.zero_stage < 3,
            }
            missing = [need for need, met in needs.items() if not met]
            if missing:
                raise ValueError(
                    f"cache_frozen_layers: needs {', '.join(missing)} (only frozen layers below the trainable ones "
                    "can be cached)"
                )

    def resolved(self) -> TrainConfig:
        """This config with local paths made absolute (Ray workers run in another directory)."""
        runs = storage.resolve(self.storage_path)
        return replace(
            self,
            data=storage.resolve(self.data),
            taxonomy=storage.resolve(self.taxonomy) if self.taxonomy else None,
            storage_path=runs,
            model=replace(self.model, name_or_path=local_or_hub(self.model.name_or_path, "model.name_or_path")),
            tracking=self.tracking.resolved(runs),  # beside the runs, under the storage root
        )

    @property
    def files(self) -> RunFiles:
        return run_files(self.storage_path, self.run_name)


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
        "bf16": {"enabled": cfg.use_gpu and cfg.model.dtype in ("auto", "bfloat16_if_native", "bfloat16")},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.deepspeed.offload_optimizer:
        config["zero_force_ds_cpu_optimizer"] = False
    config.update(cfg.deepspeed.config)
    return config
