from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_passes_the_launcher_schema():
    config = yaml.safe_load(CLUSTER.read_text())
    validate_config(prepare_config(config))  # what `ray up` does first; raises on a schema violation
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 8 and gpu["min_workers"] == 0 and gpu["max_workers"] >= 1


def test_cluster_yaml_exposes_nothing_it_should_not():
    config = yaml.safe_load(CLUSTER.read_text())
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "RAY_AUTH_MODE=disabled" not in CLUSTER.read_text()
    ports = config["provider"]["security_group"]["IpPermissions"]
    assert [(p["FromPort"], p["ToPort"]) for p in ports] == [(22, 22)]
    assert all(r["CidrIp"] != "0.0.0.0/0" for p in ports for r in p["IpRanges"])
    assert any("make setup" in command for command in config["setup_commands"])
