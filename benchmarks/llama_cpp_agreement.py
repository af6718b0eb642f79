"""An endpoint agent reading decisions from a served model's `top_logprobs`, against the local `hf` agent on the same
weights: SmolLM2-135M-Instruct's GGUF (the `smollm2` package's Q4_1 file) served by llama.cpp's OpenAI-compatible
server (`llama-cpp-python[server]`, the `llamacpp` extra), and the same file dequantized and imported (`smollm2`)
for the hf agent.

    python -m benchmarks.llama_cpp_agreement [--tasks 120] [--concurrency 4]

Two `harness eval` processes (cold) on the same first test tasks, each with one zero-shot agent: `hf` scores the
option letters after the choice prompt; `endpoint` sends the same conversation as chat messages and reads the
letters from the first generated token's log-probabilities. Agreement is the share of tasks where both choose the
same behavior; the margin columns compare how sure each was (log-probability of its first option minus the
second's, where both readouts have both letters). Throughput is each process's tasks/s, start to exit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from benchmarks.endpoint_compare import free_port
from harness.agents.making import packaged_gguf
from harness.agents.references import local_or_hub
from harness.cli.logs import LOG_DIR_ENV
from harness.data.mini import write_sample


def serve_gguf(gguf: Path, port: int, log: Path) -> subprocess.Popen:
    """llama.cpp's server on 127.0.0.1:`port`, once it lists its model; the chat template is the GGUF's own."""
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--n_ctx", "2048", "--logits_all", "true", "--n_threads", "2"]
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                return server
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise SystemExit(f"llama.cpp's server did not start; see {log}") from None
            time.sleep(1)


def harness_eval(agent: dict, data: Path, work: Path, tasks: int) -> tuple[float, pd.DataFrame]:
    """One `harness eval` process with one agent on the first `tasks` test tasks: its wall time and predictions."""
    config = {
        "data": str(data),
        "split": "test",
        "max_tasks": tasks,
        "output_dir": str(work / "eval"),
        "leaderboard": str(work / "leaderboard.parquet"),
        "answers": False,
        "content": False,
        "bootstrap": 0,
        "agents": [agent],
    }
    work.mkdir(parents=True)
    (work / "eval.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | {LOG_DIR_ENV: str(work / "logs")}
    command = [sys.executable, "-m", "harness.cli", "eval", "-c", str(work / "eval.yaml")]
    began = time.perf_counter()
    run = subprocess.run(command, cwd=work, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - began
    if run.returncode:
        raise SystemExit(f"harness eval exited {run.returncode}: {run.stderr.strip()[-500:]}")
    return seconds, pd.read_parquet(next((work / "eval").glob(f"{agent['name']}-*.parquet")))


def margin(scores: Sequence[dict] | None) -> float:
    """How sure a readout was: its best option's log-probability minus the next one's (NaN with fewer than two).
    `scores` is a row's score column as pandas reads it: {label, logprob} records."""
    values = sorted(
        (s["logprob"] for s in (scores if scores is not None else []) if s["logprob"] is not None), reverse=True
    )
    values = [v for v in values if np.isfinite(v)]
    return values[0] - values[1] if len(values) >= 2 else float("nan")


def section(work: Path, tasks: int = 120, concurrency: int = 4) -> str:
    """The comparison as Markdown."""
    work.mkdir(parents=True, exist_ok=True)
    data = write_sample(work / "data", tasks=3000, seed=1)
    gguf = packaged_gguf("smollm2", work)
    local = local_or_hub("smollm2", "model")
    hf = {"name": "hf", "model": str(local), "mode": "zero_shot", "strategy": "choice", "batch_size": 8}
    hf_seconds, hf_rows = harness_eval(hf, data, work / "hf", tasks)
    port = free_port()
    server = serve_gguf(gguf, port, work / "llama-server.log")
    try:
        served = {"name": "llamacpp", "model": str(gguf), "mode": "zero_shot", "backend": "endpoint"}
        served["endpoint"] = {"base_url": f"http://127.0.0.1:{port}/v1", "concurrency": concurrency}
        served_seconds, served_rows = harness_eval(served, data, work / "llamacpp", tasks)
    finally:
        server.kill()
    both = hf_rows.merge(served_rows, on="task_id", suffixes=("_hf", "_served"))
    same = int((both.pred_behavior_hf == both.pred_behavior_served).sum())
    margins = pd.DataFrame({"hf": both.scores_hf.map(margin), "served": both.scores_served.map(margin)}).dropna()
    correlation = margins.hf.corr(margins.served) if len(margins) > 2 else float("nan")
    readouts = ", ".join(f"{k} {v}" for k, v in served_rows.readout.value_counts().items())
    chosen = ", ".join(f"{k} {v}" for k, v in both.pred_behavior_hf.value_counts().items())
    n = len(both)
    return "\n".join(
        [
            "| work | `hf` agent (imported, float32) | endpoint agent (llama.cpp, Q4_1, top_logprobs) "
            "| same decision |",
            "|---|---|---|---|",
            f"| SmolLM2-135M-Instruct zero-shot, {n} test tasks, {concurrency} concurrent requests "
            f"| {hf_seconds:.1f} s, {n / hf_seconds:.1f} tasks/s | {served_seconds:.1f} s, {n / served_seconds:.1f} "
            f"tasks/s (readout: {readouts}) | {same}/{n} ({same / n:.1%}) |",
            "",
            f"The hf agent chose: {chosen}. Margin (best minus second option's log-probability) on the {len(margins)} "
            f"tasks where both readouts have two options: mean {margins.hf.mean():.2f} (hf) and "
            f"{margins.served.mean():.2f} (served), Pearson r {correlation:.2f}.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=120)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    print(section(Path(tempfile.mkdtemp(prefix="llama-cpp-agreement-")), args.tasks, args.concurrency))


if __name__ == "__main__":
    main()
