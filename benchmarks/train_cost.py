"""What a training epoch costs: LoRA on every layer (the SmolLM2 profile until 2026-12-04) against LoRA on the top
layers with the frozen layers below run once per task (`cache_frozen_layers`), as whole `harness train` processes on
the same model, tasks and seed.

    python -m benchmarks.train_cost [--model DIR] [--tasks 64] [--epochs 2] [--layers 4]

Each run's epochs are timed by its own worker (`epoch_seconds`, tracked in MLflow's file store), and tokens/s is its
steady state (the last reported window).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.agents.references import local_or_hub
from harness.data.mini import write_sample

CONFIG = Path(__file__).resolve().parents[1] / "harness" / "configs" / "smollm2" / "behaviorsft.yaml"
ALL_LAYERS = ["lora.layers=null", "lora.train_new_tokens=true", "cache_frozen_layers=false"]


def top_layers(layers: int) -> list[str]:
    return [f"lora.layers={layers}", "lora.train_new_tokens=false", "cache_frozen_layers=true"]


def epoch_seconds(mlruns: Path, run: str) -> list[float]:
    """The run's `epoch_seconds`, epoch by epoch, from MLflow's file store (one `timestamp value step` line each)."""
    (found,) = (
        r
        for r in mlruns.glob("*/*")
        if (r / "tags" / "mlflow.runName").exists() and (r / "tags" / "mlflow.runName").read_text() == run
    )
    lines = (found / "metrics" / "epoch_seconds").read_text().split("\n")
    return [float(line.split()[1]) for line in lines if line.strip()]


def run(work: Path, data: Path, model: str, name: str, overrides: list[str], tasks: int, epochs: int) -> dict:
    """One `harness train` process; its wall time, epoch times and steady tokens/s."""
    import json

    command = [sys.executable, "-m", "harness.cli", "train", "-c", str(CONFIG), f"run_name={name}"]
    command += [f"data={data}", f"model.name_or_path={model}", f"storage_path={work / 'runs'}"]
    command += [f"max_train_tasks={tasks}", f"epochs={epochs}", "eval_max_tasks=8", "balance_by=null"]
    command += [f"tracking.uri={work / 'mlruns'}", *overrides]
    began = time.perf_counter()
    subprocess.run(command, check=True, cwd=work, capture_output=True)
    wall = time.perf_counter() - began
    metrics = json.loads((work / "runs" / name / "final_metrics.json").read_text())
    return {"wall": wall, "epochs": epoch_seconds(work / "mlruns", name), "tokens_per_s": metrics["tokens_per_s"]}


def section(work: Path, model: str, tasks: int = 64, epochs: int = 2, layers: int = 4) -> str:
    """The comparison as a Markdown table."""
    work.mkdir(parents=True, exist_ok=True)
    data = write_sample(work / "data", tasks=3000, seed=0)
    today = run(work, data, model, "all-layers", ALL_LAYERS, tasks, epochs)
    cached = run(work, data, model, f"top-{layers}-cached", top_layers(layers), tasks, epochs)
    later = lambda r: sum(r["epochs"][1:]) / max(len(r["epochs"]) - 1, 1)  # noqa: E731
    rows = [
        ("LoRA on every layer (r 16)", today),
        (f"LoRA on the top {layers} layers, frozen layers cached", cached),
    ]
    lines = [
        f"SmolLM2-135M-Instruct, {tasks} BehaviorBench-mini train tasks, {epochs} epochs, batch 8, 2 CPUs, one worker.",
        "",
        "| configuration | first epoch | each later epoch | steady tokens/s | run wall | later epoch vs every layer |",
        "|---|---|---|---|---|---|",
    ]
    for label, result in rows:
        lines.append(
            f"| {label} | {result['epochs'][0]:.0f} s | {later(result):.0f} s | {result['tokens_per_s']:.0f} | "
            f"{result['wall']:.0f} s | {later(today) / later(result):.2f}x cheaper |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="a model reference (default: the packaged SmolLM2)")
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="train-cost-"))
    print(section(work, local_or_hub(args.model, "--model"), args.tasks, args.epochs, args.layers))


if __name__ == "__main__":
    main()
