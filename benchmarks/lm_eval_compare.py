"""lm-evaluation-harness itself against `harness eval`: same model, same rendered prompts, same tasks.

lm-evaluation-harness (the `bench` extra: `pip install -e ".[bench]"`) runs as its own `lm_eval --model hf`
process on a local `multiple_choice` task whose choices are the behavior tokens, its documents being the
prompts the harness renders (`harness.agents.selection.agent_prompt`). The harness runs in this process
(`evaluate()`, one Ray Data job). Decisions are compared task by task: the arg-max of lm-eval's
log-likelihoods against the harness's `pred_label`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from benchmarks.memory import PeakMemory
from harness.agents.loading import load_tokenizer
from harness.agents.selection import Mode, Strategy, agent_prompt
from harness.agents.tokens import TokenDesign
from harness.core.config import build
from harness.data.io import load_tasks
from harness.data.taxonomy import load_taxonomy
from harness.evaluate.config import EvalConfig
from harness.evaluate.driver import evaluate

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class Run:
    seconds: float
    peak_bytes: int
    labels: dict[str, str]  # task_id -> chosen label


def lm_eval_binary() -> str:
    """`lm_eval` beside this interpreter (the `bench` extra), or `$LM_EVAL_BIN` (e.g. a separate venv's)."""
    binary = os.environ.get("LM_EVAL_BIN") or shutil.which("lm_eval", path=str(Path(sys.executable).parent))
    if not binary:
        raise SystemExit('lm_eval not found: pip install -e ".[bench]" (or set LM_EVAL_BIN)')
    return binary


def write_task(model_dir: Path, data: Path, split: str, out: Path, name: str) -> tuple[Path, list[str]]:
    """A local lm-eval task over the split's rendered behaviorsft prompts; returns its folder and the labels
    in choice order."""
    taxonomy = load_taxonomy()
    tokenizer, design = load_tokenizer(str(model_dir)), TokenDesign.load(model_dir)
    assert design is not None, f"{model_dir} has no token design"
    labels = list(taxonomy.labels(design.granularity))
    frame = load_tasks(data, split=split).sort_values("task_id")
    out.mkdir(parents=True, exist_ok=True)
    with (out / "docs.jsonl").open("w") as handle:
        for row in frame.to_dict("records"):
            prompt = agent_prompt(
                tokenizer, list(row["messages"]), Mode.BEHAVIORSFT, Strategy.BEHAVIOR_TOKEN, design, taxonomy
            )
            gold = labels.index(taxonomy.label_of(design.granularity, row["category"], row["gold_behavior"]))
            handle.write(json.dumps({"task_id": row["task_id"], "prompt": prompt.text, "gold": gold}) + "\n")
    spec = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(out / "docs.jsonl")}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{prompt}}",
        "doc_to_choice": [design.token(label) for label in labels],
        "doc_to_target": "{{gold}}",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc"}],
    }
    (out / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return out, labels


def run_lm_eval(model_dir: Path, task_dir: Path, name: str, labels: list[str], out: Path, batch_size: int) -> Run:
    """One `lm_eval` process: wall time, peak memory of its process tree, and its decision per task."""
    command = [
        lm_eval_binary(),
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model_dir},dtype=float32",
        "--include_path",
        str(task_dir),
        "--tasks",
        name,
        "--batch_size",
        str(batch_size),
        "--device",
        "cpu",
        "--log_samples",
        "--output_path",
        str(out),
    ]
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **OFFLINE})
        with PeakMemory(process.pid) as memory:
            code = process.wait()
    seconds = time.perf_counter() - began
    if code != 0:
        raise SystemExit(f"lm_eval exited {code}; see {log}")
    chosen = {}
    for samples in out.rglob(f"samples_{name}_*.jsonl"):
        for line in samples.read_text().splitlines():
            sample = json.loads(line)
            loglikelihoods = [float(resp[0]) for resp in sample["filtered_resps"]]
            chosen[sample["doc"]["task_id"]] = labels[loglikelihoods.index(max(loglikelihoods))]
    return Run(seconds, memory.peak, chosen)


def run_harness(model_dir: Path, data: Path, split: str, out: Path, agents: int, batch_size: int) -> Run:
    """`harness eval` in this process: `agents` behaviorsft agents on one model, one Ray Data job."""
    specs = [
        {"name": f"agent-{i}", "model": str(model_dir), "mode": "behaviorsft", "num_cpus": 2 / agents}
        | {"batch_size": batch_size}
        for i in range(agents)
    ]
    cfg = build(
        EvalConfig,
        {"data": str(data), "split": split, "answers": False, "bootstrap": 0, "output_dir": str(out), "agents": specs},
    )
    with PeakMemory() as memory:
        began = time.perf_counter()
        result = evaluate(cfg)
        seconds = time.perf_counter() - began
    if result.failures:
        raise SystemExit("; ".join(result.failures))
    predictions = pd.read_parquet(next(out.glob("agent-0-*.parquet")))
    return Run(seconds, memory.peak, dict(zip(predictions.task_id, predictions.pred_label, strict=True)))


def agreement(a: dict[str, str], b: dict[str, str]) -> tuple[int, int]:
    """(tasks where both chose the same label, tasks both decided)."""
    shared = a.keys() & b.keys()
    return sum(a[t] == b[t] for t in shared), len(shared)


def compare(
    model_dir: Path, label: str, sizes: dict[str, Path], work: Path, four_agents: Path | None, batch_size: int = 16
) -> tuple[list[tuple[str, ...]], list[tuple[int, float]]]:
    """Rows of the comparison table: per size, lm-eval and the harness side by side; then four agents. Also the
    harness's one-agent (tasks, seconds) per size."""
    rows, times = [], []
    for size_name, data in sizes.items():
        name = f"behaviorbench_{label}_{size_name}".replace("-", "_")
        task_dir, labels = write_task(model_dir, data, "test", work / "tasks" / name, name)
        peer = run_lm_eval(model_dir, task_dir, name, labels, work / "lm_eval" / name, batch_size)
        ours = run_harness(model_dir, data, "test", work / "harness" / name, 1, batch_size)
        same, n = agreement(peer.labels, ours.labels)
        times.append((n, ours.seconds))
        mix = pd.Series(list(ours.labels.values())).value_counts(normalize=True)
        rows.append(
            (
                f"{label}, {n} tasks, 1 agent",
                f"{peer.seconds:.1f} s, {n / peer.seconds:.0f} tasks/s, {peer.peak_bytes / 2**30:.2f} GiB",
                f"{ours.seconds:.1f} s, {n / ours.seconds:.0f} tasks/s, {ours.peak_bytes / 2**30:.2f} GiB",
                f"{peer.seconds / ours.seconds:.2f}x",
                f"{same}/{n} ({', '.join(f'{k} {v:.0%}' for k, v in mix.items())})",
            )
        )
    if four_agents is not None:
        name = f"behaviorbench_{label}_four".replace("-", "_")
        task_dir, labels = write_task(model_dir, four_agents, "test", work / "tasks" / name, name)
        peers = [
            run_lm_eval(model_dir, task_dir, name, labels, work / "lm_eval" / f"{name}-{i}", batch_size)
            for i in range(4)
        ]
        ours = run_harness(model_dir, four_agents, "test", work / "harness" / name, 4, batch_size)
        seconds = sum(p.seconds for p in peers)
        same, n = agreement(peers[0].labels, ours.labels)
        rows.append(
            (
                f"{label}, 4 agents x {n} tasks (lm-eval: 4 sequential runs)",
                f"{seconds:.1f} s, {4 * n / seconds:.0f} tasks/s, {max(p.peak_bytes for p in peers) / 2**30:.2f} GiB",
                f"{ours.seconds:.1f} s, {4 * n / ours.seconds:.0f} tasks/s, {ours.peak_bytes / 2**30:.2f} GiB",
                f"{seconds / ours.seconds:.2f}x",
                f"{same}/{n}",
            )
        )
    return rows, times


def start_up(times: list[tuple[int, float]]) -> str:
    """The harness's fixed start-up and per-task time: the line through its two one-agent (tasks, seconds)."""
    (n1, t1), (n2, t2) = times
    per_task = (t2 - t1) / (n2 - n1)
    return (
        f"Harness fixed start-up (the intercept of its {n1}- and {n2}-task times): {t1 - per_task * n1:.1f} s; "
        f"then {per_task * 1000:.2f} ms a task ({1 / per_task:.0f} tasks/s)."
    )


HEADER = (
    "| work | lm-evaluation-harness | `harness eval` | ratio (lm-eval time / harness time) | decision agreement |",
    "|---|---|---|---|---|",
)


def section(work: Path, model_dir: Path | None = None, smollm2: bool = False) -> str:
    """The comparison as Markdown: the tiny model with behavior tokens (or `model_dir`) at about 520 and
    5,000 tasks and four agents at 520; SmolLM2-135M-Instruct at 520 when `smollm2`."""
    from harness.agents.making import add_behavior_tokens, make_tiny
    from harness.agents.references import local_or_hub
    from harness.data.mini import write_sample

    small = write_sample(work / "data-3400", tasks=3400, seed=0)  # 532 test tasks
    large = write_sample(work / "data-32600", tasks=32600, seed=0)  # about 5,000 test tasks
    taxonomy = load_taxonomy()
    if model_dir is None:
        model_dir = add_behavior_tokens(make_tiny(small, work / "tiny"), work / "tiny-bsft", TokenDesign(), taxonomy)
    rows, times = compare(model_dir, "tiny", {"small": small, "large": large}, work, four_agents=small)
    if smollm2:
        smol = add_behavior_tokens(local_or_hub("smollm2", "model"), work / "smollm2-bsft", TokenDesign(), taxonomy)
        rows += compare(smol, "smollm2", {"small": small}, work, four_agents=None)[0]
    return "\n".join([*HEADER, *("| " + " | ".join(r) + " |" for r in rows), "", start_up(times)])


def main() -> None:
    import argparse
    import tempfile

    import ray

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a behaviorsft model directory (default: the untrained tiny one)")
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M-Instruct at 520 tasks")
    args = parser.parse_args()
    began = time.perf_counter()
    ray.init(logging_level="ERROR", log_to_driver=False)
    print(f"Ray start-up: {time.perf_counter() - began:.1f} s (once per driver; not in the harness times)")
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(section(Path(tempfile.mkdtemp(prefix="lm-eval-compare-")), args.model, args.smollm2))


if __name__ == "__main__":
    main()
