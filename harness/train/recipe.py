"""One Ray Train worker's BehaviorSFT (or SFT) run: `train_loop_per_worker` builds a `BehaviorSFTRecipe` and runs it.

The recipe has torchtune's named steps: `setup` (model, token design, LoRA, `deepspeed.initialize`, data shards,
tracking on rank 0, then `resume` from the last checkpoint) and `train` (epochs of length-bucketed batches,
`validate` on dev, `save` checkpoints through `ray.train.report`).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from harness.agents.loading import load_model, load_tokenizer
from harness.agents.references import local_copy
from harness.agents.selection import Mode, Selector, Strategy, label_behavior
from harness.core.config import build, to_dict
from harness.core.errors import ConfigError
from harness.data.taxonomy import load_taxonomy
from harness.results.metrics import macro_f1, type_shares
from harness.results.run_record import peak_bf16_flops, run_record, save_record
from harness.results.tracking import NoTracker, Tracker, open_run
from harness.train.config import LoraSettings, TrainConfig, deepspeed_config
from harness.train.data import bucketed_batches, pad_batch
from harness.train.frozen import FrozenLayers
from harness.train.layout import CONFIG_NAME

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


def deepspeed_env(use_gpu: bool) -> dict[str, str] | None:
    """What every worker of a training job must have in its environment: DeepSpeed's CPU accelerator on CPUs."""
    return None if use_gpu else {"DS_ACCELERATOR": "cpu"}


def prepare_deepspeed(use_gpu: bool) -> None:
    """In a worker, before DeepSpeed is imported: its accelerator (picked at import time) and the toolchain of its
    JIT-built ops.

    The ops are built by the first `ninja` on PATH into `~/.cache/torch_extensions`. A job's workers and a local
    run's may find different ninja versions (this environment's, installed with DeepSpeed, or the system's), whose
    build logs disagree, so each switch rebuilt the op (about a minute on 2 CPUs); without a system ninja and an
    activated environment the build failed. The interpreter's own bin directory comes first, as activation does.
    """
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir


def wrap_lora(model: PreTrainedModel, lora: LoraSettings, new_token_ids: list[int]) -> PreTrainedModel:
    """LoRA adapters on `target_modules` of every decoder layer (or the top `lora.layers`), plus the new
    behavior-token rows as trainable tokens (unless `lora.train_new_tokens` is off)."""
    from peft import LoraConfig, get_peft_model

    count = model.config.num_hidden_layers
    if lora.layers is not None and lora.layers > count:
        raise ConfigError(f"lora.layers: {lora.layers}, but the model has {count} decoder layers")
    trained = list(new_token_ids) if lora.train_new_tokens else []
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        layers_to_transform=list(range(count - lora.layers, count)) if lora.layers else None,
        task_type="CAUSAL_LM",
        trainable_token_indices={"embed_tokens": trained} if trained else None,
    )
    return get_peft_model(model, config)


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


def _gathered(model: Any, stage: int) -> AbstractContextManager:
    import deepspeed

    return (
        deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None) if stage == 3 else nullcontext()
    )


def _save_model(model: Any, tokenizer: Any, cfg: TrainConfig, out: Path, merge: bool) -> None:
    """A loadable Hugging Face directory: weights (or the LoRA adapter), tokenizer, design, config."""
    to_save = model.merge_and_unload() if merge else model
    to_save.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    cfg.design.save(out)
    (out / CONFIG_NAME).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


@dataclass
class _Window:
    """Losses and tokens of this worker since the last metrics report."""

    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)


class BehaviorSFTRecipe:
    """One Ray Train worker's BehaviorSFT/SFT run in named steps, torchtune's recipe shape: `setup` (ending
    with `resume`), `train`, `validate` and `save`. Rank 0 also tracks the run (`harness.tracking`)."""

    def __init__(self, config: dict[str, Any]):
        self.cfg = build(TrainConfig, config["train"])
        self.steps_per_epoch: int = config["steps_per_epoch"]
        self.state: dict[str, Any] = {"epoch": 0, "batch_in_epoch": 0, "global_step": 0, "initial": {}}
        self.tracker: Tracker = NoTracker()
        self.latest_dev: dict[str, float] = {}
        self.metrics: dict[str, Any] = {}  # the latest window's metrics, carried by the next checkpoint's report
        self.window = _Window()
        self.preemption_saved = False  # a just-in-time checkpoint was taken on a preemption notice
        self.frozen: FrozenLayers | None = None  # the kept output of the frozen lower layers (cache_frozen_layers)
        self.frozen_checked = False

    def setup(self) -> None:
        """The model with the token design (and LoRA) under `deepspeed.initialize`, the data shards, the tracking
        run on rank 0; then `resume`."""
        cfg = self.cfg
        prepare_deepspeed(cfg.use_gpu)
        import deepspeed
        import ray.train
        import torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        torch.manual_seed(cfg.seed)
        if not cfg.use_gpu:
            torch.set_num_threads(max(1, int(cfg.resources_per_worker.get("CPU", 1))))
        self.taxonomy = load_taxonomy(cfg.taxonomy)
        source = local_copy(cfg.model.name_or_path)  # a model in a bucket: this node's copy
        self.tokenizer = load_tokenizer(source, cfg.model.trust_remote_code)
        model = load_model(source, cfg.model.dtype, cfg.model.trust_remote_code, cfg.use_gpu)
        new_rows = cfg.design.apply(self.tokenizer, model, self.taxonomy) if cfg.mode is Mode.BEHAVIORSFT else []
        model.config.use_cache = False
        if cfg.lora.enabled:
            model = wrap_lora(model, cfg.lora, new_rows)
        count = model.config.num_hidden_layers
        self.frozen = FrozenLayers(model, count - cfg.lora.layers) if cfg.cache_frozen_layers else None
        self.parameters = sum(p.numel() for p in model.parameters())  # frozen ones too (see _window_metrics)
        if self.rank == 0:  # before deepspeed.initialize, whose broadcast lines the workers up again after it
            self.tracker = self._open_tracking()
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(cfg, self.world, self.total_steps // cfg.gradient_accumulation),
        )
        peak = peak_bf16_flops(torch.cuda.get_device_name()) if cfg.use_gpu else None
        self.peak_flops = peak * self.world if peak else None
        self.dev = list(ray.train.get_dataset_shard("dev").iter_rows())[: cfg.eval_max_tasks]
        self.shard = ray.train.get_dataset_shard("train")
        self.resume()

    def _open_tracking(self) -> Tracker:
        """Write the run record into the run directory and open (or continue) the run's tracking run."""
        cfg = self.cfg
        batch = {
            "batch_size": cfg.batch_size,
            "gradient_accumulation": cfg.gradient_accumulation,
            "workers": self.world,
            "global_batch_size": cfg.batch_size * cfg.gradient_accumulation * self.world,
        }
        record = run_record(batch, {"seed": cfg.seed})
        save_record(cfg.files.record, record)
        params = {**to_dict(cfg), "design": {**to_dict(cfg.design), "name": cfg.design.name}}
        return open_run(cfg.tracking, "train", cfg.run_name, cfg.files.tracking, params, record)

    def resume(self) -> None:
        """Continue from the run's latest checkpoint, if any: DeepSpeed state and this recipe's progress."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return
        # A directory of this worker's own: `as_directory` shares one per checkpoint between the processes of a
        # machine, and one worker's clean-up can delete it while another waits for it (Ray 2.60).
        with tempfile.TemporaryDirectory(prefix="harness-resume-") as directory:
            checkpoint.to_directory(directory)
            _, client = self.engine.load_checkpoint(
                str(Path(directory) / "deepspeed"), tag="state", load_module_strict=not self.cfg.lora.enabled
            )
        self.state.update({k: client[k] for k in self.state})
        if self.rank == 0:
            state = self.state
            print(f"[harness] resuming {self.cfg.run_name} at epoch {state['epoch']} step {state['global_step']}")

    def validate(self) -> dict[str, float]:
        """Dev loss and, for BehaviorSFT, Macro F1 of behavior selection, selected as evaluation selects."""
        import torch

        cfg, module, tokenizer = self.cfg, self.engine.module, self.tokenizer
        device = next(module.parameters()).device
        losses, gold, pred, types = [], [], [], []
        selecting = cfg.mode is Mode.BEHAVIORSFT  # standard SFT has no behavior tokens: dev loss only
        selector = (
            Selector(module, tokenizer, self.taxonomy, cfg.mode, Strategy.BEHAVIOR_TOKEN, cfg.design)
            if selecting
            else None
        )
        module.eval()
        with torch.no_grad():
            for start in range(0, len(self.dev), cfg.batch_size):
                chunk = self.dev[start : start + cfg.batch_size]
                batch = {k: v.to(device) for k, v in pad_batch(chunk, tokenizer.pad_token_id).items()}
                if self.frozen is not None:
                    loss, chosen = self._validate_kept(batch, chunk, selector)
                else:
                    loss, chosen = module(**batch).loss.float().item(), self._select(selector, chunk)
                losses.append(loss)
                pred += chosen
                gold += [r["gold_behavior"] for r in chunk] if selector else []
                types += [r["task_type"] for r in chunk] if selector else []
        module.train()
        metrics = {"dev_loss": sum(losses) / max(len(losses), 1)}
        if gold:
            metrics["dev_macro_f1"] = macro_f1(gold, pred)
            metrics |= type_shares(types, gold, pred, prefix="dev_")
        return metrics

    def _select(self, selector: Selector | None, chunk: list[dict[str, Any]]) -> list[str]:
        """Behaviors of dev tasks selected from their own prompts, as evaluation selects."""
        return [s.behavior for s in selector.select([list(r["prompt_ids"]) for r in chunk])] if selector else []

    def _validate_kept(
        self, batch: dict[str, torch.Tensor], chunk: list[dict[str, Any]], selector: Selector | None
    ) -> tuple[float, list[str]]:
        """A dev batch through the kept lower layers: its loss, and each task's behavior from the same pass, as
        evaluation selects it. A task whose example holds less of its prompt than evaluation sees (cut to
        `max_length`), or a design whose tokens are not single tokens, is selected from its own prompt."""
        import numpy as np

        ids = [str(r["task_id"]) for r in chunk]
        single = selector is not None and all(len(row) == 1 for row in selector.label_ids)
        loss, scores = self.frozen.validate(batch, ids, [row[0] for row in selector.label_ids] if single else [0])
        if not single:
            return loss.item(), self._select(selector, chunk)
        chosen = [selector.labels[j] for j in scores.argmax(1).tolist()]
        design, taxonomy = self.cfg.design, self.taxonomy
        behaviors = [label_behavior(taxonomy, Strategy.BEHAVIOR_TOKEN, design, label) for label in chosen]
        for i, row in enumerate(chunk):
            start = int(np.argmax(np.asarray(row["labels"]) != -100))
            if list(row["input_ids"][:start]) != list(row["prompt_ids"]):
                behaviors[i] = self._select(selector, [row])[0]
        return loss.item(), behaviors

    def save(self, metrics: dict[str, Any], final: bool) -> None:
        """Validate, then report `metrics` with the dev metrics and a checkpoint: the DeepSpeed state with this
        recipe's progress and the model (plus the merged LoRA model when final). The final one closes tracking."""
        import ray.train

        cfg = self.cfg
        self.latest_dev.update(self.validate())
        metrics = {**metrics, **self.state["initial"], **self.latest_dev}
        with tempfile.TemporaryDirectory() as tmp:
            self.engine.save_checkpoint(
                str(Path(tmp) / "deepspeed"),
                tag="state",
                client_state=dict(self.state),
                exclude_frozen_parameters=cfg.lora.enabled,
            )
            with _gathered(self.engine.module, cfg.deepspeed.zero_stage):
                if self.rank == 0:
                    _save_model(self.engine.module, self.tokenizer, cfg, Path(tmp) / "model", merge=False)
                    if final and cfg.lora.enabled:
                        _save_model(self.engine.module, self.tokenizer, cfg, Path(tmp) / "merged", merge=True)
            name = f"checkpoint_epoch{self.state['epoch']:03d}_step{self.state['global_step']:07d}"
            self._report(metrics, ray.train.Checkpoint.from_directory(tmp), name)
        if final:
            self.tracker.set_tags({"final_model": str(cfg.files.final)})  # where the driver exports it
            self.tracker.log_json("final_metrics.json", metrics)
            self.tracker.finish()

    def _log(self, metrics: dict[str, Any]) -> None:
        """Track `metrics` and write them to the run's progress file (what the driver's bar shows)."""
        self.tracker.log_metrics(metrics, step=self.state["global_step"])
        if self.rank == 0:
            numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            progress = {"step": self.state["global_step"], "total": self.total_steps, "metrics": numbers}
            self.cfg.files.progress.write_text(json.dumps(progress))

    def _report(self, metrics: dict[str, Any], checkpoint: Any, name: str) -> None:
        """Log `metrics`, then report them to Ray Train with `checkpoint`.

        Only checkpoints are reported: each worker's report waits until the controller collects the previous
        one, which it does every 2 s (`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`), so a report every few steps held a
        GPU run at 0.5 s a step. Tune (a sweep's ASHA) therefore sees one result per checkpoint.
        """
        import ray.train

        self._log(metrics)  # first: when a checkpoint is persisted (and a run can resume from it), its metrics are too
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def train(self) -> None:
        """Train the remaining epochs; the tracking run is marked failed when training raises."""
        cfg, state = self.cfg, self.state
        try:
            if not state["initial"]:  # the untrained model's dev metrics, the baseline of this run
                state["initial"] = {f"initial_{k}": v for k, v in self.validate().items()}
            # Every report and log carries the latest dev metrics, so schedulers (Tune's ASHA) always see them.
            self.latest_dev = {k.removeprefix("initial_"): v for k, v in state["initial"].items()}
            for epoch in range(state["epoch"], cfg.epochs):
                state["epoch"] = epoch
                began = time.perf_counter()
                self._train_epoch(epoch)
                # This worker's time for the epoch's steps (a resumed epoch's: for the steps left), dev set aside.
                self.metrics["epoch_seconds"] = time.perf_counter() - began
                state["batch_in_epoch"] = 0
                if epoch == cfg.epochs - 1:
                    state["epoch"] = cfg.epochs
                    self.save({**self.metrics, "completed": True}, final=True)  # not "done": Tune reserves it
                elif not cfg.checkpoint_every:
                    state["epoch"] = epoch + 1
                    self.save(self.metrics, final=False)
        except BaseException:
            self.tracker.finish(ok=False)
            raise

    def _train_epoch(self, epoch: int) -> None:
        """One epoch's remaining batches; reports every `log_every` steps, checkpoints every `checkpoint_every`."""
        cfg, state = self.cfg, self.state
        skip = state["batch_in_epoch"]
        batches = bucketed_batches(self.shard, cfg.batch_size, self.tokenizer.pad_token_id, cfg.seed + epoch)
        for index, (batch, task_ids) in enumerate(batches):
            if index < skip:
                continue
            batch = {k: v.to(self.engine.device) for k, v in batch.items()}
            loss = self._loss(batch, task_ids)
            self.engine.backward(loss)
            self.engine.step()
            state["batch_in_epoch"] = index + 1
            state["global_step"] += 1
            self.window.losses.append(loss.float().item())
            self.window.tokens += int(batch["attention_mask"].sum())
            last = state["batch_in_epoch"] == self.steps_per_epoch and epoch == cfg.epochs - 1
            checkpoint_now = bool(cfg.checkpoint_every) and state["global_step"] % cfg.checkpoint_every == 0
            checkpoint_now = checkpoint_now and not last  # the last step's checkpoint is the final one
            reporting = state["global_step"] % cfg.log_every == 0
            if reporting and not checkpoint_now and not last and self._preempted():
                checkpoint_now = True  # just in time, before the node is reclaimed
            if reporting or last:
                self.metrics = self._window_metrics(epoch)
                if not checkpoint_now and not last:  # a checkpoint's report carries these metrics
                    self._log({**self.metrics, **self.latest_dev})
            if checkpoint_now:
                self.save(self.metrics, final=False)

    def _preempted(self) -> bool:
        """Whether Ray Train has a preemption notice for a node of this run (a spot node about to be reclaimed),
        the first time it has one. Every worker asks at the same steps: the call is a barrier across them."""
        import ray.train

        if self.preemption_saved:
            return False
        notice = ray.train.get_preemption_info()
        if notice is None:
            return False
        self.preemption_saved = True
        if self.rank == 0:
            nodes = ", ".join(node[:8] for node in notice.preempted_node_ids)
            print(f"[harness] preemption notice for node {nodes}: checkpointing at step {self.state['global_step']}")
        return True

    def _loss(self, batch: dict[str, Any], task_ids: list[str]) -> torch.Tensor:
        if self.frozen is not None:
            return self._upper_loss(batch, task_ids)
        if self.cfg.behavior_loss_weight == 1.0:
            return self.engine(**batch).loss
        logits = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return weighted_loss(logits, batch["labels"], self.cfg.behavior_loss_weight)

    def _upper_loss(self, batch: dict[str, Any], task_ids: list[str]) -> torch.Tensor:
        """The loss from the kept hidden states through the top layers (`harness.train.frozen`). Before the first
        step, both ways are compared without dropout: the kept layers must give the whole model's loss."""
        import torch

        weight = self.cfg.behavior_loss_weight
        if not self.frozen_checked:
            self.frozen_checked = True
            module = self.engine.module
            module.eval()
            with torch.no_grad():
                kept, whole = (
                    self.frozen.loss(batch, task_ids, weight).item(),
                    self.frozen.whole_loss(batch, weight).item(),
                )
            module.train()
            if abs(kept - whole) > 1e-3 * max(1.0, abs(whole)):
                raise ConfigError(
                    f"cache_frozen_layers: the loss through the kept layers ({kept:.6f}) is not the whole model's "
                    f"({whole:.6f}); this model's layers cannot be cached"
                )
        return self.frozen.loss(batch, task_ids, weight)

    def _window_metrics(self, epoch: int) -> dict[str, Any]:
        """The metrics of the window since the last report, which starts a new window.

        `achieved_flops_per_s` is 6 x N x tokens/s with N all the model's parameters (the PaLM paper's MFU
        appendix, without its attention term) and tokens/s the unpadded tokens of all workers; `mfu` divides
        it by the workers' peak bf16 FLOP/s, on GPUs the table in `harness.run_record` knows.
        """
        elapsed = time.perf_counter() - self.window.start
        tokens_per_s = self.window.tokens * self.world / elapsed
        flops = 6 * self.parameters * tokens_per_s
        metrics = {
            "loss": sum(self.window.losses) / len(self.window.losses),
            "tokens_per_s": tokens_per_s,
            "achieved_flops_per_s": flops,
            **({"mfu": flops / self.peak_flops} if self.peak_flops else {}),
            "learning_rate": self.scheduler.get_last_lr()[0],
            "epoch": epoch,
            "step": self.state["global_step"],
        }
        self.window = _Window()
        return metrics


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: build the recipe and run it."""
    recipe = BehaviorSFTRecipe(config)
    recipe.setup()
    recipe.train()
