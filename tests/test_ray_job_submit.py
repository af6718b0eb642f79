"""`ray job submit` against a real local Ray cluster that this test starts and stops."""

import os
import signal
import socket
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

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ray_job_submit_runs_an_evaluation_job(sample, tiny_model, tmp_path, no_suite_ray):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    # Free ports everywhere Ray has a fixed default: another Ray instance (the suite's) may be running.
    gcs, dashboard, agent, client = _free_port(), _free_port(), _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayjob")  # short: Ray's socket paths have a length limit
    head = subprocess.Popen(
        [
            str(bin_dir / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={agent}",
            f"--ray-client-server-port={client}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (401 without a token: authentication is on)
            except OSError:
                assert time.time() < deadline and head.poll() is None, "the local Ray cluster did not start"
                time.sleep(1)
        config = tmp_path / "eval.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "data": str(sample),
                    "split": "test",
                    "max_tasks": 16,
                    "part_size": 8,
                    "max_new_tokens": 4,
                    "bootstrap": 50,
                    "output_dir": str(tmp_path / "eval"),
                    "leaderboard": str(tmp_path / "lb.parquet"),
                    "agents": [{"name": "zero-shot", "model": str(tiny_model), "mode": "zero_shot", "num_cpus": 0.5}],
                }
            )
        )
        submit = [str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--"]
        submit += ["python", "jobs/evaluate.py", "--config", str(config)]
        deadline = time.time() + 180
        while True:  # the dashboard answers before the node's job agent is ready: Ray says to retry
            run = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in run.stdout + run.stderr or time.time() > deadline:
                break
            time.sleep(3)
        agent_log = Path(temp_dir, "session_latest", "logs", "dashboard_agent.log")
        agent_tail = agent_log.read_text()[-3000:] if agent_log.exists() else "(no dashboard_agent.log)"
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:] + agent_tail
        assert "succeeded" in run.stdout + run.stderr
        predictions = list((tmp_path / "eval").glob("zero-shot-*.parquet"))
        assert len(predictions) == 1 and len(pd.read_parquet(predictions[0])) == 16
        board = pd.read_parquet(tmp_path / "lb.parquet")
        assert set(board.agent) == {"zero-shot"}

        denied = subprocess.run(
            [str(bin_dir / "ray"), "job", "list", "--address", address],
            cwd=REPO,
            env={**env, "RAY_AUTH_MODE": "disabled"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert denied.returncode != 0  # token authentication is on: no token, no job API
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
