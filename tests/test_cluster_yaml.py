import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.ray_nodes import free_port, stop_ray_node

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"
BIN = Path(sys.executable).parent


def _config() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_passes_the_launcher_schema():
    config = _config()
    validate_config(prepare_config(config))  # what `ray up` does first; raises on a schema violation
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 8 and gpu["min_workers"] == 0 and gpu["max_workers"] >= 1


def test_cluster_yaml_has_spot_worker_types():
    spot = {
        name: node
        for name, node in _config()["available_node_types"].items()
        if node["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    }
    assert {"gpu_spot_worker", "eval_spot_worker"} <= set(spot)
    assert all(node["min_workers"] == 0 and node["resources"]["GPU"] >= 1 for node in spot.values())


def test_cluster_yaml_exposes_nothing_it_should_not():
    config = _config()
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "RAY_AUTH_MODE=disabled" not in CLUSTER.read_text()
    # Ray's AWS launcher adds SSH from 0.0.0.0/0 to a group it creates, whatever rules the provider section
    # lists; it creates none when every node type names its own pre-created group.
    assert "security_group" not in config["provider"]
    for node in config["available_node_types"].values():
        groups = node["node_config"]["SecurityGroupIds"]
        assert groups and all(g.startswith("sg-") for g in groups)
    assert any("make setup" in command for command in config["setup_commands"])


def test_every_node_starts_with_the_token_that_ray_up_mounts():
    config = _config()
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts)


def _head_command(temp_dir: str, dashboard: int) -> tuple[dict[str, str], list[str]]:
    """cluster.yaml's head `ray start` (its env assignments and flags), with free ports and no autoscaler."""
    (command,) = [c for c in _config()["head_start_ray_commands"] if "ray start" in c]
    words = shlex.split(command.split(";", 1)[1])
    env = dict(w.split("=", 1) for w in words[: words.index("ray")])
    flags = [w for w in words[words.index("ray") + 2 :] if not w.startswith(("--port", "--autoscaling-config"))]
    flags = [w for w in flags if not w.startswith("--object-manager-port")]
    ports = [f"--port={free_port()}", f"--object-manager-port={free_port()}", f"--dashboard-port={dashboard}"]
    ports += [f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}"]
    argv = [str(BIN / "ray"), "start", *flags, *ports, "--num-cpus=1", "--block", f"--temp-dir={temp_dir}"]
    return env, argv


@pytest.mark.slow
def test_a_head_started_as_cluster_yaml_does_refuses_clients_without_the_token(tmp_path, tiny_model, no_suite_ray):
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"
    laptop, node, stranger = tmp_path / "laptop", tmp_path / "node", tmp_path / "stranger"
    for home in (laptop, node, stranger):
        home.mkdir()
    # Where `ray up` runs: the README's first step makes the token.
    made = subprocess.run(
        [str(BIN / "ray"), "get-auth-token", "--generate"],
        env={**base, "HOME": str(laptop), "RAY_AUTH_MODE": "token"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    token = laptop / ".ray" / "auth_token"
    # file_mounts: the same file on the node, whose HOME is otherwise empty.
    (node / ".ray").mkdir()
    shutil.copy(token, node / ".ray" / "auth_token")
    dashboard = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayauth")
    env, argv = _head_command(temp_dir, dashboard)
    log = tmp_path / "head.log"
    with log.open("w") as output:
        head = subprocess.Popen(
            argv, env={**base, **env, "HOME": str(node)}, stdout=output, stderr=output, start_new_session=True
        )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/jobs/", timeout=2)
                pytest.fail("the job API answered a request without a token")
            except urllib.error.HTTPError as error:
                assert error.code in (401, 403)
                break
            except OSError:
                started = time.time() < deadline and head.poll() is None
                assert started, f"the head did not start: {log.read_text()[-3000:]}"
                time.sleep(1)

        def jobs(home: Path, mode: str) -> subprocess.CompletedProcess:
            client = {**base, "HOME": str(home), "RAY_AUTH_MODE": mode}
            command = [str(BIN / "ray"), "job", "list", "--address", address]
            return subprocess.run(command, env=client, capture_output=True, text=True, timeout=120)

        refused = jobs(stranger, "disabled")
        assert refused.returncode != 0 and "Unauthorized" in refused.stdout + refused.stderr
        assert jobs(stranger, "token").returncode != 0  # token mode, but no token to send
        allowed = jobs(laptop, "token")
        assert allowed.returncode == 0, allowed.stdout[-2000:] + allowed.stderr[-2000:]
        # The harness joining it (the GCS address) without the token: one line that says what to do.
        gcs = next(a for a in argv if a.startswith("--port=")).removeprefix("--port=")
        train = ["train", "--address", f"127.0.0.1:{gcs}", f"model.name_or_path={tiny_model}"]
        joined = subprocess.run(
            [str(BIN / "harness"), *train, f"storage_path={tmp_path / 'runs'}"],
            env={**base, "HOME": str(stranger), "RAY_AUTH_MODE": "disabled", "HARNESS_LOG_DIR": str(tmp_path / "logs")},
            cwd=stranger,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (joined.returncode, joined.stderr) == (
            1,
            f"error: address 127.0.0.1:{gcs}: the cluster requires token authentication: set RAY_AUTH_MODE=token, "
            "with the cluster's token in ~/.ray/auth_token or $RAY_AUTH_TOKEN (docs/clusters.md)\n",
        )
        assert not (tmp_path / "runs").exists()
    finally:
        stop_ray_node(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
