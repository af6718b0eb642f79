"""Experiment tracking through `harness.tracking` into a real MLflow file store, and the run record."""

import importlib.util
import json
import os
import platform
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import harness
from harness.core import config, storage
from harness.core.config import differing_keys
from harness.core.errors import ConfigError
from harness.evaluate.config import AgentSpec, EvalConfig
from harness.evaluate.driver import record_evaluation
from harness.evaluate.runs import ResolvedAgent
from harness.results.metrics import score
from harness.results.predictions import PredictionStore
from harness.results.run_record import code_version, peak_bf16_flops, run_record
from harness.results.tracking import NoTracker, TrackingSettings, open_run
from harness.train.config import RUNTIME_KEYS, TrainConfig
from tests.test_metrics import named


def _search(uri: str, experiment: str) -> pd.DataFrame:
    import mlflow

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[experiment])


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


@pytest.fixture(scope="module")
def record() -> dict:
    return run_record({"batch_size": 8, "gradient_accumulation": 2}, {"seed": 3})


def test_the_record_has_versions_hardware_batch_seeds_and_git_state(record):
    assert record["versions"]["python"] == platform.python_version()
    for key, distribution in [("torch", "torch"), ("ray", "ray"), ("deepspeed", "deepspeed"), ("peft", "peft")]:
        assert record["versions"][key] == version(distribution)
    assert {"transformers", "harness"} <= set(record["versions"])
    hardware = record["hardware"]
    assert hardware["cpu_count"] == os.cpu_count() and hardware["memory_gib"] > 0 and isinstance(hardware["gpus"], list)
    assert record["batch"] == {"batch_size": 8, "gradient_accumulation": 2} and record["seeds"] == {"seed": 3}
    assert record["git"]["commit"] == code_version()
    differs = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=Path(harness.__file__).parent).returncode == 1
    assert record["git"]["dirty"] is differs


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("Tesla T4", None),
    ],
)
def test_peak_flops_by_device_name(name, peak):
    assert peak_bf16_flops(name) == peak


def test_the_store_defaults_to_mlruns_beside_the_runs_root(tmp_path: Path):
    overrides = [f"storage_path={tmp_path / 'runs'}", "model.name_or_path=org/model"]
    cfg = config.load(TrainConfig, None, overrides).resolved()
    assert cfg.tracking.uri == (tmp_path / "mlruns").as_uri()
    assert TrackingSettings(uri="http://mlflow:5000").resolved(tmp_path).uri == "http://mlflow:5000"
    assert TrackingSettings(uri="rel/store").resolved(tmp_path).uri == (Path.cwd() / "rel" / "store").as_uri()
    changed = config.load(TrainConfig, None, ["tracking.experiment=sweep-x", "tracking.uri=http://h:5000"])
    unchanged = differing_keys(TrainConfig, config.to_dict(TrainConfig()), config.to_dict(changed), RUNTIME_KEYS)
    assert unchanged == []  # where it is tracked only


def test_runs_under_a_directory_named_artifacts_are_tracked_at_the_storage_root(tmp_path: Path, record):
    # MLflow's file store refuses any run whose path has an `artifacts` component; the default runs root is one.
    settings = TrackingSettings().resolved(tmp_path / "artifacts" / "runs")
    assert settings.uri == (tmp_path / "mlruns").as_uri()
    tracker = open_run(settings, "train", "r1", tmp_path / "tracking.json", {"a": 1}, record)
    assert tracker.run_id and _client(settings.uri).get_run(tracker.run_id).data.params == {"a": "1"}
    with pytest.raises(ConfigError, match=r"^tracking.uri: MLflow's file store cannot keep runs under a directory"):
        TrackingSettings(uri=str(tmp_path / "artifacts" / "mlruns")).resolved(tmp_path)


def test_a_bad_backend_is_one_line_naming_the_key():
    with pytest.raises(ConfigError, match=r"^config: tracking: backend: 'tensorboard' is not one of"):
        config.load(TrainConfig, None, ["tracking.backend=tensorboard"])


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_wandb_installed_says_how_to_install_it():
    with pytest.raises(ConfigError, match=r"^config: tracking: backend: wandb is selected but not installed: pip"):
        config.load(TrainConfig, None, ["tracking.backend=wandb"])


def test_a_run_gets_params_metrics_and_artifacts_and_a_resumed_run_continues_it(tmp_path: Path, record):
    settings = TrackingSettings().resolved(tmp_path / "runs")
    state = tmp_path / "runs" / "r1" / "tracking.json"
    params = {"design": {"spelling": "special"}, "learning_rate": 0.1, "resources_per_worker": {"CPU": 1}}
    first = open_run(settings, "train", "r1", state, params, record)
    first.log_metrics({"loss": 2.0, "completed": False, "note": "not a number"}, step=5)
    resumed = open_run(settings, "train", "r1", state, {**params, "epochs": 3}, record)
    assert resumed.run_id == first.run_id == json.loads(state.read_text())["run_id"]
    resumed.log_metrics({"loss": 1.0, "completed": True}, step=10)
    resumed.log_json("final_metrics.json", {"loss": 1.0})
    resumed.finish()

    runs = _search(settings.uri, "train")
    assert list(runs["run_id"]) == [first.run_id]
    run = runs.iloc[0]
    assert (run["status"], run["tags.mlflow.runName"]) == ("FINISHED", "r1")
    assert (run["params.design.spelling"], run["params.learning_rate"], run["params.epochs"]) == ("special", "0.1", "3")
    assert run["params.resources_per_worker.CPU"] == "1"
    assert run["tags.record.versions.torch"] == record["versions"]["torch"]
    assert run["tags.record.git.commit"] == record["git"]["commit"]
    assert "metrics.note" not in runs
    client = _client(settings.uri)
    assert sorted((m.step, m.value) for m in client.get_metric_history(first.run_id, "loss")) == [(5, 2.0), (10, 1.0)]
    assert client.get_run(first.run_id).data.metrics["completed"] == 1.0
    assert {a.path for a in client.list_artifacts(first.run_id)} == {"final_metrics.json", "run_record.json"}

    elsewhere = TrackingSettings(uri=str(tmp_path / "other")).resolved(tmp_path)
    moved = open_run(elsewhere, "train", "r1", state, params, record).run_id
    assert moved != first.run_id and json.loads(state.read_text())["run_id"] == moved  # not that store's run
    for experiment in (tmp_path / "other").iterdir():  # the store loses the run (its root stays: MLflow caches it)
        if experiment.name not in ("0", ".trash"):
            shutil.rmtree(experiment)
    assert open_run(elsewhere, "train", "r1", state, params, record).run_id not in (first.run_id, moved)


def test_backend_none_tracks_nothing(tmp_path: Path, record):
    settings = TrackingSettings(backend="none").resolved(tmp_path / "runs")
    tracker = open_run(settings, "train", "r1", tmp_path / "tracking.json", {"a": 1}, record)
    assert isinstance(tracker, NoTracker) and not (tmp_path / "tracking.json").exists()
    assert not (tmp_path / "mlruns").exists()


def _predictions(n: int = 120) -> pd.DataFrame:
    types = np.resize(["reactive", "proactive", "restraint"], n)
    gold = np.where(types == "proactive", "proactive", "reactive")
    pred = np.where(np.arange(n) % 5 == 0, np.where(gold == "proactive", "reactive", "proactive"), gold)
    return pd.DataFrame(
        {
            "task_id": [f"t{i}" for i in range(n)],
            "case_id": [f"c{i // 2}" for i in range(n)],
            "category": types,
            "task_type": types,
            "gold_behavior": gold,
            "pred_behavior": pred,
            "hard": np.arange(n) % 4 == 0,
        }
    )


def test_an_evaluation_is_recorded_and_tracked_in_one_run_per_agent_run(tmp_path: Path):
    out = tmp_path / "eval"
    out.mkdir()
    predictions = PredictionStore(storage.location(out, "output_dir"), "zs-abc123")
    _predictions().to_parquet(predictions.final.path)
    spec = AgentSpec(name="zs", model="tiny")
    agent = ResolvedAgent(spec, "/models/tiny", None, "abc123")
    cfg = EvalConfig(agents=[spec], output_dir=str(out))
    metrics = score(_predictions(), samples=20)
    record_evaluation(cfg, agent, "fingerprint1", metrics, predictions, actors=2)
    record_file = out / "zs-abc123.record.json"
    record = {**json.loads(record_file.read_text()), "job": "first"}
    record_file.write_text(json.dumps(record))
    # A re-run scores the same agent run again.
    record_evaluation(cfg, agent, "fingerprint1", metrics, predictions, actors=1)
    assert json.loads(record_file.read_text()) == record  # kept: it is the record of the job that predicted

    assert record["batch"] == {"batch_size": 16, "part_size": 256} and record["seeds"] == {"bootstrap": 0}
    assert record["actors"] == 2
    runs = _search((tmp_path / "mlruns").as_uri(), "eval")
    assert len(runs) == 1
    run = runs.iloc[0]
    assert (run["tags.mlflow.runName"], run["params.run_id"], run["params.dataset"]) == (
        "zs-abc123",
        "abc123",
        "fingerprint1",
    )
    assert (run["params.agent.mode"], run["params.agent.strategy"]) == ("zero_shot", spec.strategy.value)
    for subset, slice_name, metric in [
        ("all", "overall", "macro_f1"),
        ("hard", "type:proactive", "intervened_when_should"),
    ]:
        rows = named(metrics)
        row = rows[(rows.subset == subset) & (rows.slice == slice_name) & (rows.metric == metric)].iloc[0]
        name = f"metrics.{subset}/{slice_name}/{metric}"
        assert run[name] == pytest.approx(row.value)
        assert (run[f"{name}.ci_low"], run[f"{name}.ci_high"]) == pytest.approx((row.ci_low, row.ci_high))
    artifacts = {a.path for a in _client((tmp_path / "mlruns").as_uri()).list_artifacts(run["run_id"])}
    assert artifacts == {"zs-abc123.parquet", "run_record.json"}
