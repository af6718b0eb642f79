"""The main job: BehaviorBench-mini -> tiny model -> token-design sweep -> BehaviorSFT and SFT with
the best design -> parallel evaluation of four agents -> leaderboard. Each step reuses its output."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness import config as configs
from harness import leaderboard
from harness.errors import ConfigError
from harness.evaluate import EvalConfig, evaluate
from harness.sweep import SweepConfig, sweep
from harness.tokens import TokenDesign
from harness.train import TrainConfig, train


@dataclass
class PipelineConfig:
    artifacts: str = "artifacts"
    results: str = "results"
    tasks: int = 3000
    seed: int = 0
    sweep_config: str = "jobs/configs/sweep.yaml"
    train_config: str = "jobs/configs/behaviorsft.yaml"
    eval_config: str = "jobs/configs/eval.yaml"


def _step(log: Callable[[str], None], number: int, title: str, work: Callable[[], Any]) -> Any:
    log(f"[{number}/6] {title} ...")
    began = time.perf_counter()
    value = work()
    log(f"[{number}/6] {title}: done in {time.perf_counter() - began:.0f}s")
    return value


def run(cfg: PipelineConfig, log: Callable[[str], None] = print, progress=None) -> Path:
    """Run every step whose output is missing; return the leaderboard Parquet path."""
    from harness.bench.synth import write_sample
    from harness.model import make_tiny

    artifacts, results = Path(cfg.artifacts), Path(cfg.results)
    data, model, runs = artifacts / "data" / "tasks.jsonl", artifacts / "tiny-qwen2", artifacts / "runs"
    paths = [f"data={data}", f"runs_dir={runs}"]
    model_path = f"model.name_or_path={model}"

    def make_data() -> None:
        if not data.exists():
            write_sample(data.parent, tasks=cfg.tasks, seed=cfg.seed)

    def make_model() -> None:
        if not (model / "config.json").exists():
            make_tiny(data, model, seed=cfg.seed)

    def run_sweep() -> dict[str, Any]:
        overrides = [f"train.data={data}", f"train.{model_path}", f"runs_dir={runs}"]
        sweep_cfg = configs.load(SweepConfig, cfg.sweep_config, overrides)
        best = sweep_cfg.directory / "best.json"
        if not best.exists():
            table = sweep(sweep_cfg)
            log(table.to_string(index=False, max_colwidth=40))
        chosen = json.loads(best.read_text())
        log(f"best trial {chosen['trial_id']}: design {chosen['design']}, dev Macro F1 {chosen['dev_macro_f1']:.3f}")
        return chosen

    def train_both(best: dict[str, Any]) -> None:
        chosen = TokenDesign.load(best["final_model"])  # the design the best trial saved with its model
        if chosen is None:
            raise ConfigError(f"best trial {best['trial_id']}: no token design saved in {best['final_model']}")
        design = [f"design.{key}={value}" for key, value in asdict(chosen).items()]
        if best.get("learning_rate") is not None:
            design.append(f"learning_rate={best['learning_rate']}")
        common = [f"data={data}", model_path, f"storage_path={runs}"]
        for mode in ("behaviorsft", "sft"):
            overrides = [*common, *design, f"mode={mode}", f"run_name={mode}-tiny"]
            result = train(configs.load(TrainConfig, cfg.train_config, overrides))
            shown = {k: round(v, 4) for k, v in result.metrics.items() if k.startswith(("dev_", "initial_dev"))}
            log(f"{mode}: {result.final_model} {shown}")

    def run_eval() -> EvalConfig:
        board = results / "leaderboard.parquet"
        eval_cfg = configs.load(
            EvalConfig, cfg.eval_config, [*paths, f"output_dir={artifacts / 'eval'}", f"leaderboard={board}"]
        )
        for agent in eval_cfg.agents:  # the embedded default: point the untrained agents at this model
            if agent.model == "artifacts/tiny-qwen2":
                agent.model = str(model)
        evaluate(eval_cfg, progress=progress)
        return eval_cfg

    _step(log, 1, "BehaviorBench-mini (synthetic sample)", make_data)
    _step(log, 2, "tiny Qwen2 model and tokenizer", make_model)
    best = _step(log, 3, "token-design sweep (Ray Tune, ASHA)", run_sweep)
    _step(log, 4, "BehaviorSFT and SFT training with the best design (Ray Train + DeepSpeed)", lambda: train_both(best))
    eval_cfg = _step(log, 5, "evaluation of four agents in parallel (Ray Data)", run_eval)

    def export() -> None:
        table = leaderboard.ranking(leaderboard.read(eval_cfg.leaderboard))
        leaderboard.export(table, results / "leaderboard.html", "html")
        leaderboard.export(table, results / "leaderboard.md", "md")

    _step(log, 6, "leaderboard export", export)
    return Path(eval_cfg.leaderboard)
