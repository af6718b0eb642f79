"""`harness eval` against lm-evaluation-harness as whole processes, the way a user runs them: each command is timed
from its start to its exit, on the same model (the tiny model with behavior tokens), the same rendered prompts and
the same tasks, at about 450 and about 4,500 test tasks.

    python -m benchmarks.whole_process          # needs the bench extra (lm_eval)

Three ways of running the harness, side by side with one `lm_eval --model hf` process:
- cold: `harness eval` starts its own local Ray, as on a laptop with no cluster;
- running cluster: `ray start --head` first (not timed, with token auth), then `harness eval --address`;
- cold, 1 replica: the agent's `replicas: 1`, the default before replicas filled the machine.

The agent's replicas are left to fill the machine (one actor per CPU of the cluster), and it scores behavior tokens only
(`answers: false`, `content: false`), as lm-eval's `multiple_choice` task does. The marginal rate is the slope
between the two sizes; the rest of a command's time is its fixed start-up. From each harness log: Ray Data's own
execution time of the evaluation, so start-up (imports, Ray, actors) and the evaluation can be told apart.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from benchmarks.lm_eval_compare import agreement, run_lm_eval, write_task
from harness.agents.making import add_behavior_tokens, make_tiny
from harness.agents.tokens import TokenDesign
from harness.cli.logs import LOG_DIR_ENV
from harness.data.mini import write_sample
from harness.data.taxonomy import load_taxonomy

EXECUTION = re.compile(r"execution finished in ([0-9.]+) seconds", re.IGNORECASE)
RUNS = (("lm-eval", "lm-eval"), ("cold", "harness cold"), ("running", "running cluster"), ("one", "cold, 1 replica"))
PORT = 6391  # the running cluster's GCS port: away from a default cluster's 6379


@dataclass(frozen=True)
class Timed:
    seconds: float  # the whole process, start to exit
    execution: float  # Ray Data's execution of the evaluation (0 for lm-eval)
    labels: dict[str, str]  # task_id -> chosen label


def harness_eval(
    model_dir: Path,
    data: Path,
    work: Path,
    name: str,
    replicas: int | None,
    address: str | None,
    auth: dict[str, str] | None = None,
) -> Timed:
    """One `harness eval` process (cold when `address` is None; `auth`: the running cluster's token settings) with
    one behaviorsft agent."""
    agent = {"name": "bsft", "model": str(model_dir), "mode": "behaviorsft", "batch_size": 16}
    if replicas is not None:
        agent["replicas"] = replicas
    out = work / name
    out.mkdir(parents=True)
    config = {
        "data": str(data),
        "split": "test",
        "output_dir": str(out / "eval"),
        "leaderboard": str(out / "leaderboard.parquet"),
        "answers": False,
        "content": False,
        "agents": [agent],
    }
    (out / "eval.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    command = [sys.executable, "-m", "harness.cli", "eval", "-c", str(out / "eval.yaml")]
    command += ["--address", address] if address else []
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # cold: no cluster to join
    env |= auth or {}
    began = time.perf_counter()
    run = subprocess.run(command, cwd=out, capture_output=True, text=True, env={**env, LOG_DIR_ENV: str(out / "logs")})
    seconds = time.perf_counter() - began
    if run.returncode:
        raise SystemExit(f"harness eval exited {run.returncode}: {run.stderr.strip()[-500:]}")
    logged = "".join(path.read_text() for path in (out / "logs").glob("*.log"))
    executions = [float(value) for value in EXECUTION.findall(logged)]
    predictions = pd.read_parquet(next((out / "eval").glob("bsft-*.parquet")))
    labels = dict(zip(predictions.task_id, predictions.pred_label, strict=True))
    return Timed(seconds, max(executions, default=0.0), labels)


def _ray(*args: str, auth: dict[str, str] | None = None) -> None:
    env = os.environ | (auth or {})
    subprocess.run([str(Path(sys.executable).parent / "ray"), *args], check=True, capture_output=True, env=env)


def section(work: Path) -> str:
    """The comparison as Markdown."""
    work.mkdir(parents=True, exist_ok=True)
    sizes = {
        "about 450": write_sample(work / "data-3000", tasks=3000, seed=1),
        "about 4,500": write_sample(work / "data-30000", tasks=30000, seed=1),
    }
    taxonomy = load_taxonomy()
    model = add_behavior_tokens(
        make_tiny(sizes["about 450"], work / "tiny"), work / "tiny-bsft", TokenDesign(), taxonomy
    )
    rows, points = [], {}
    for size, data in sizes.items():
        key = size.replace("about ", "").replace(",", "")
        task_dir, labels = write_task(model, data, "test", work / "tasks" / f"t{key}", f"behaviorbench_wp_{key}")
        peer = run_lm_eval(model, task_dir, f"behaviorbench_wp_{key}", labels, work / "lm_eval" / key, 16)
        cold = harness_eval(model, data, work, f"cold-{key}", None, None)
        one = harness_eval(model, data, work, f"cold-one-{key}", 1, None)
        # With token auth, as a cluster should run (and as `ray start --head` does anyway where ~/.ray/auth_token is).
        auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        _ray("start", "--head", f"--port={PORT}", "--disable-usage-stats", auth=auth)
        try:
            warm = harness_eval(model, data, work, f"running-{key}", None, f"127.0.0.1:{PORT}", auth)
        finally:
            _ray("stop", "--force")
        n = len(peer.labels)
        same, both = agreement(peer.labels, cold.labels)
        points[size] = {"n": n, "lm-eval": peer.seconds, "cold": cold.seconds, "running": warm.seconds}
        points[size]["one"] = one.seconds
        rows.append(
            f"| {n} | {peer.seconds:.1f} s | {cold.seconds:.1f} s ({peer.seconds / cold.seconds:.2f}x; Ray Data "
            f"{cold.execution:.1f} s) | {warm.seconds:.1f} s ({peer.seconds / warm.seconds:.2f}x; Ray Data "
            f"{warm.execution:.1f} s) | {one.seconds:.1f} s ({peer.seconds / one.seconds:.2f}x) | {same}/{both} |"
        )
    small, large = points.values()
    slopes = {
        key: (large["n"] - small["n"]) / (large[key] - small[key]) for key in ("lm-eval", "cold", "running", "one")
    }
    return "\n".join(
        [
            "| test tasks | lm-evaluation-harness | `harness eval`, cold | `harness eval`, running cluster | "
            "`harness eval`, cold, `replicas: 1` | same decisions |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "Marginal rate (tasks/s, the slope between the two sizes): "
            + "; ".join(f"{label} {slopes[key]:.0f} ({slopes[key] / slopes['lm-eval']:.2f}x)" for key, label in RUNS),
        ]
    )


def main() -> None:
    import tempfile

    print(section(Path(tempfile.mkdtemp(prefix="whole-process-"))))


if __name__ == "__main__":
    main()
