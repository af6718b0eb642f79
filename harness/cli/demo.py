"""The main job, in profiles. `tiny` (the default): BehaviorBench-mini -> tiny model -> token-design sweep ->
BehaviorSFT and SFT with the best design -> parallel evaluation of four agents -> leaderboard. `smollm2`: the
same comparison on SmolLM2-135M-Instruct, imported from its package, with LoRA and no sweep.
Each step reuses its output."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, TypeVar

from harness.agents.making import make_tiny
from harness.agents.references import TINY_MODEL, is_model_dir, local_or_hub, models_dir
from harness.agents.selection import Mode
from harness.agents.tokens import TokenDesign
from harness.core import config as configs
from harness.core.cluster import connect
from harness.core.errors import ConfigError
from harness.data.mini import is_sample, write_sample
from harness.evaluate.config import EvalConfig
from harness.evaluate.driver import evaluate
from harness.results import leaderboard
from harness.train.config import TrainConfig
from harness.train.driver import train
from harness.train.recipe import deepspeed_env
from harness.train.sweep import SweepConfig, finished_best, summary, sweep

CONFIGS = Path(str(resources.files("harness") / "configs"))  # the shipped configs (package data)
T = TypeVar("T")


@dataclass(frozen=True)
class Profile:
    """What `harness demo --profile NAME` runs: its base model, its step configs and where results go."""

    base_model: str  # a model named in the models dir: TINY_MODEL (made from the data) or a packaged model
    train_config: str  # under CONFIGS
    eval_config: str
    sweep_config: str | None = None  # None: train with the train config's own token design
    results: str = ""  # sub-directory of the results root
    gpu_train: dict[str, Any] | None = None  # what `--gpu` sets beyond GPU_TRAIN; None: the profile is CPU-only
    gpu_eval: dict[str, Any] = field(default_factory=dict)

    def gpu_training(self) -> dict[str, Any]:
        """What `--gpu` sets on each training config (dotted keys)."""
        return {**GPU_TRAIN, **(self.gpu_train or {})}


PROFILES = {
    "tiny": Profile(TINY_MODEL, "behaviorsft.yaml", "eval.yaml", "sweep.yaml"),
    "smollm2": Profile(
        "smollm2",
        "smollm2/behaviorsft.yaml",
        "smollm2/eval.yaml",
        results="smollm2",
        # The CPU sizing caps tasks and epochs; one GPU trains on the whole train split and scores the whole test split.
        gpu_train={"max_train_tasks": None, "eval_max_tasks": 512, "epochs": 2},
        gpu_eval={"max_tasks": None},
    ),
}
# What `harness demo --gpu` sets on every training: one worker per GPU (nccl, bf16). The sweep stays on CPU.
GPU_TRAIN: dict[str, Any] = {"use_gpu": True, "resources_per_worker": {"CPU": 4, "GPU": 1}}


@dataclass
class PipelineConfig:
    artifacts: str = "artifacts"
    results: str = "results"
    profile: str = "tiny"
    gpu: bool = False  # train and evaluate on this node's GPU (the agents share it)
    tasks: int = 3000
    seed: int = 0
    address: str | None = None  # the Ray cluster (HOST:PORT); None: $RAY_ADDRESS, else a local cluster

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"profile: {self.profile!r} is not one of {list(PROFILES)}")
        if self.gpu and PROFILES[self.profile].gpu_train is None:
            gpu_ready = [name for name, profile in PROFILES.items() if profile.gpu_train is not None]
            raise ValueError(f"gpu: profile {self.profile!r} runs on CPU (its sweep); GPU profiles: {gpu_ready}")


def step_config(cls: type[T], path: Path, values: dict[str, Any]) -> T:
    """Config `cls` read from `path` with each dotted key of `values` set to its (typed) value."""
    loaded = configs.read_yaml(path, "config") or {}
    for key, value in values.items():
        configs.set_dotted(loaded, key, value, str(path))
    return configs.build(cls, loaded, str(path))


def training_values(mode: Mode, run_name: str, best: dict[str, Any] | None) -> dict[str, Any]:
    """What the training of `mode` sets: its mode and run name and, after a sweep, every key the sweep
    searched at the best trial's value (typed, as the trial ran) and the token design saved with its model."""
    values: dict[str, Any] = {"mode": mode.value, "run_name": run_name}
    if best is not None:
        values.update(best["searched"])
        chosen = TokenDesign.load(best["final_model"])
        if chosen is None:
            raise ConfigError(f"best trial {best['trial_id']}: no token design saved in {best['final_model']}")
        values["design"] = asdict(chosen)
    return values


class Progress(Protocol):
    """What the pipeline reports progress to (the CLI's bars)."""

    def training(self, run: str, step: int, total: int, metrics: dict[str, float]) -> None: ...

    def evaluation(self, agent: str, done: int, total: int) -> None: ...


def _step(log: Callable[[str], None], number: int, title: str, work: Callable[[], Any]) -> Any:
    log(f"[{number}/6] {title} ...")
    began = time.perf_counter()
    value = work()
    log(f"[{number}/6] {title}: done in {time.perf_counter() - began:.0f}s")
    return value


def sharing_one_gpu(cfg: EvalConfig) -> EvalConfig:
    """`cfg` with its agents' actors (every replica) sharing one GPU equally."""
    share = 1 / sum(agent.replicas or 1 for agent in cfg.agents)
    return replace(cfg, agents=[replace(agent, num_gpus=share) for agent in cfg.agents])


def require_gpu() -> None:
    """Refuse a cluster too small for a GPU training worker: Ray would wait for it forever."""
    import ray

    have, need = ray.cluster_resources(), GPU_TRAIN["resources_per_worker"]
    if any(have.get(name, 0) < amount for name, amount in need.items()):
        held = ", ".join(f"{have.get(name, 0):g} {name}" for name in need)
        wanted = ", ".join(f"{amount:g} {name}" for name, amount in need.items())
        raise ConfigError(f"gpu: the Ray cluster has {held}; a GPU training worker needs {wanted}")


def run(cfg: PipelineConfig, log: Callable[[str], None] = print, progress: Progress | None = None) -> Path:
    """Run every step whose output is missing; return the leaderboard Parquet path. `progress` is told of each
    training report and of each evaluated part of the predictions."""
    profile = PROFILES[cfg.profile]
    # GPU runs are sized and placed differently: their runs, predictions and results sit beside the CPU ones.
    suffix = "-gpu" if cfg.gpu else ""
    artifacts, results = Path(cfg.artifacts), Path(cfg.results) / f"{profile.results}{suffix}"
    os.environ.setdefault("HARNESS_MODELS_DIR", str(artifacts / "models"))  # where configs' model names resolve
    data, runs, base = artifacts / "data" / "tasks.jsonl", artifacts / f"runs{suffix}", profile.base_model
    board = results / "leaderboard.parquet"

    def make_data() -> None:
        if not data.exists():
            write_sample(data.parent, tasks=cfg.tasks, seed=cfg.seed)
        elif not is_sample(data):
            raise ConfigError(
                f"--artifacts: {data} is not a BehaviorBench-mini sample (`harness data make`), which the demo "
                "reuses; remove it or choose another --artifacts"
            )

    def make_model() -> str:
        tiny = models_dir() / TINY_MODEL
        if base == TINY_MODEL and not is_model_dir(tiny):
            make_tiny(data, tiny, seed=cfg.seed)
        return local_or_hub(base, "base model")  # imports a packaged model on first use

    def run_sweep() -> dict[str, Any] | None:
        if profile.sweep_config is None:
            log("no sweep in this profile: training uses the train config's token design")
            return None
        paths = {"train.data": str(data), "train.model.name_or_path": base, "runs_dir": str(runs)}
        sweep_cfg = step_config(SweepConfig, CONFIGS / profile.sweep_config, paths)
        chosen = finished_best(sweep_cfg)
        if chosen is None:
            table = sweep(sweep_cfg, progress=progress and progress.training)
            log(summary(table, sweep_cfg).to_string(index=False, max_colwidth=40))
            chosen = finished_best(sweep_cfg)
        log(f"best trial {chosen['trial_id']}: design {chosen['design']}, dev Macro F1 {chosen['dev_macro_f1']:.3f}")
        return chosen

    def train_both(best: dict[str, Any] | None) -> None:
        path = CONFIGS / profile.train_config
        paths = {"data": str(data), "model.name_or_path": base, "storage_path": str(runs)}
        base_name = str((configs.read_yaml(path, "config") or {}).get("run_name", Mode.BEHAVIORSFT.value))
        for mode in (Mode.BEHAVIORSFT, Mode.SFT):
            run_name = base_name.replace(Mode.BEHAVIORSFT.value, mode.value, 1)
            values = {**paths, **training_values(mode, run_name, best)}
            if cfg.gpu:
                values.update(profile.gpu_training())
            result = train(step_config(TrainConfig, path, values), progress=progress and progress.training)
            shown = {k: round(v, 4) for k, v in result.metrics.items() if k.startswith(("dev_", "initial_dev"))}
            log(f"{mode.value}: {result.final_model} {shown}")

    def run_eval() -> EvalConfig:
        paths: dict[str, Any] = {
            "data": str(data),
            "runs_dir": str(runs),
            "output_dir": str(artifacts / f"eval{suffix}"),
            "leaderboard": str(board),
        }
        eval_cfg = step_config(
            EvalConfig, CONFIGS / profile.eval_config, {**paths, **(profile.gpu_eval if cfg.gpu else {})}
        )
        if cfg.gpu:
            eval_cfg = sharing_one_gpu(eval_cfg)
        result = evaluate(eval_cfg, progress=progress and progress.evaluation)
        leaderboard.append(board, result.metrics)
        for note in result.notes:
            log(note)
        result.raise_failures(str(board))
        return eval_cfg

    connect(cfg.address, deepspeed_env(cfg.gpu))  # every step's Ray work joins this cluster
    if cfg.gpu:
        require_gpu()
    _step(log, 1, "BehaviorBench-mini (synthetic sample)", make_data)
    _step(log, 2, f"base model ({profile.base_model})", make_model)
    best = _step(log, 3, "token-design sweep (Ray Tune, ASHA)", run_sweep)
    _step(log, 4, "BehaviorSFT and SFT training (Ray Train + DeepSpeed)", lambda: train_both(best))
    _step(log, 5, "evaluation of four agents in parallel (Ray Data)", run_eval)

    def export() -> None:
        table = leaderboard.ranking(leaderboard.read(board))
        leaderboard.export(table, results / "leaderboard.html", "html", "--results")
        leaderboard.export(table, results / "leaderboard.md", "md", "--results")

    _step(log, 6, "leaderboard export", export)
    return board
