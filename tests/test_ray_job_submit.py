"""The README's `ray job submit` commands, run verbatim against a real local Ray cluster that this test starts
(token auth on, in an empty HOME) in a copy of the repository holding what `make demo` leaves behind."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness.agents.making import add_behavior_tokens
from harness.agents.tokens import TokenDesign
from harness.cli.demo import CONFIGS, step_config
from harness.core import config
from harness.data.mini import write_sample
from harness.data.taxonomy import load_taxonomy
from harness.train.sweep import SweepConfig
from tests.ray_nodes import free_port, stop_ray_node, suite_build_cache

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
JOB_TASKS = 96  # 64 train, 16 dev, 16 test tasks: the README's jobs and configs on less data
NOT_UPLOADED = (".git", ".venv", "artifacts", "results", "__pycache__", ".pytest_cache", ".ruff_cache")


def readme_submits() -> dict[str, str]:
    """The `ray job submit` lines of the README's local recipe, by entrypoint script."""
    section = (REPO / "README.md").read_text().split("## Ray jobs and clusters", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("ray job submit")]
    return {re.search(r"jobs/(\w+)\.py", line).group(1): line for line in lines}


def test_the_readme_submits_evaluate_train_and_pipeline_with_a_root():
    submits = readme_submits()
    assert set(submits) == {"evaluate", "train", "pipeline"}
    assert all('--root "$PWD"' in line and "--working-dir ." in line for line in submits.values())


def _demo_state(repo: Path, tiny_model: Path) -> None:
    """What `make demo` leaves under artifacts/ before training: the data, the tiny model and the sweep's
    best trial (a model with the winning token design: the train config's own)."""
    data = write_sample(repo / "artifacts" / "data", tasks=JOB_TASKS, seed=7)  # the suite's sample's generator, smaller
    shutil.copytree(tiny_model, repo / "artifacts" / "models" / "tiny-qwen2")
    sweep = repo / "artifacts" / "runs" / "sweeps" / "token-designs"
    design = TokenDesign(granularity="behavior", spelling="special", placement="assistant", init="phrase")
    final = add_behavior_tokens(tiny_model, sweep / "trials" / "t0" / "final", design, load_taxonomy())
    searched = {"design.spelling": "special", "learning_rate": 0.003}
    best = {"trial_id": "t0", "design": design.name, "searched": searched, "dev_macro_f1": 0.5}
    (sweep / "best.json").write_text(json.dumps({**best, "final_model": str(final)}))
    # The config the sweep saved, as the demo job builds it (paths under its --root): a finished sweep is reused
    # only with it.
    values = {"train.data": str(data), "train.model.name_or_path": "tiny-qwen2", "runs_dir": str(sweep.parent.parent)}
    saved = config.to_dict(step_config(SweepConfig, CONFIGS / "sweep.yaml", values))
    (sweep / "sweep_config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))


@pytest.mark.slow
def test_readme_ray_job_submit_commands_run_verbatim(tiny_model, tmp_path, no_suite_ray):
    repo = tmp_path / "repo"
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns(*NOT_UPLOADED))
    _demo_state(repo, tiny_model)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "HARNESS_"))}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env['PATH']}", RAY_AUTH_MODE="token")
    env.update(suite_build_cache())  # in the empty HOME the workers would build DeepSpeed's op again (a minute)
    # The README's recipe: a token where the cluster starts (a fresh HOME has none), then `ray start --head`;
    # free ports everywhere Ray has a fixed default, since another Ray instance may be running.
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    dashboard = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayjob")  # short: Ray's socket paths have a length limit
    ports = [f"--port={free_port()}", f"--dashboard-port={dashboard}"]
    ports += [f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}"]
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", *ports, "--num-cpus=2", f"--temp-dir={temp_dir}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    env["RAY_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{env['RAY_ADDRESS']}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (401 without a token: authentication is on)
            except OSError:
                assert time.time() < deadline and head.poll() is None, "the local Ray cluster did not start"
                time.sleep(1)
        submits = readme_submits()
        for script in ("train", "pipeline", "evaluate"):  # the pipeline trains sft-tiny, which evaluate names
            deadline = time.time() + 180
            while True:  # the dashboard answers before the node's job agent is ready: Ray says to retry
                run = subprocess.run(
                    ["bash", "-c", submits[script]], cwd=repo, env=env, capture_output=True, text=True, timeout=900
                )
                if "No available agent" not in run.stdout + run.stderr or time.time() > deadline:
                    break
                time.sleep(3)
            assert run.returncode == 0, f"{script}: " + run.stdout[-4000:] + run.stderr[-4000:]
            assert "succeeded" in run.stdout + run.stderr and "tracking off" not in run.stdout + run.stderr

        for script in ("train", "demo", "eval"):  # each job's full log is under the root, not in its code's copy
            assert list((repo / "artifacts" / "logs").glob(f"{script}-*.log")), script
        runs = repo / "artifacts" / "runs"
        for name in ("behaviorsft-tiny", "sft-tiny"):
            assert (runs / name / "final" / "config.json").exists()
        board = pd.read_parquet(repo / "results" / "leaderboard.parquet")
        assert set(board.agent) == {"zero-shot", "instructed", "sft", "behaviorsft"}
        assert len(list((repo / "artifacts" / "eval").glob("*.parquet"))) >= 4
        tracked = {path.read_text() for path in (repo / "mlruns").glob("*/*/tags/mlflow.runName")}
        assert {"behaviorsft-tiny", "sft-tiny"} <= tracked  # MLflow's file store, at the root the jobs were given

        denied = subprocess.run(
            [str(BIN / "ray"), "job", "list"],
            env={**env, "RAY_AUTH_MODE": "disabled"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert denied.returncode != 0  # token authentication is on: no token, no job API
    finally:
        stop_ray_node(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
