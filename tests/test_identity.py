"""Identity and resume: what decides that earlier results may be reused, without Ray."""

from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness.core import config
from harness.core.errors import ConfigError, HarnessError
from harness.core.storage import location
from harness.data.taxonomy import load_taxonomy
from harness.evaluate.config import EvalConfig
from harness.evaluate.runs import resolve_agents
from harness.results.predictions import COLUMNS, PredictionStore
from harness.train.config import TrainConfig
from harness.train.driver import train
from harness.train.layout import CONFIG_NAME


def test_a_trained_run_is_not_reused_or_resumed_under_another_config(sample, tiny_model, tmp_path):
    values = {"data": str(sample), "model": {"name_or_path": str(tiny_model)}, "storage_path": str(tmp_path)}
    cfg = config.build(TrainConfig, {**values, "run_name": "r", "learning_rate": 0.001})
    run_dir = tmp_path / "r"
    (run_dir / "checkpoint_epoch001_step0000004").mkdir(parents=True)  # the run has progress
    (run_dir / CONFIG_NAME).write_text(yaml.safe_dump(config.to_dict(cfg.resolved())))
    changed = config.build(TrainConfig, {**values, "run_name": "r", "learning_rate": 0.002, "log_every": 3})
    with pytest.raises(ConfigError, match=r"run r: .* another config \(learning_rate differ\)"):
        train(changed)  # refused before Ray starts; log_every only changes how it runs

    (run_dir / CONFIG_NAME).unlink()  # a run directory of unknown origin: its config cannot be compared
    (run_dir / "final").mkdir()
    (run_dir / "final" / "config.json").write_text("{}")
    (run_dir / "final_metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match=rf"run r: {run_dir} holds a model or checkpoints but no {CONFIG_NAME}"):
        train(cfg)  # neither reused nor resumed
    assert not (run_dir / CONFIG_NAME).exists()


def test_the_eval_run_id_covers_the_taxonomy_and_the_strategy(sample, tiny_model, tmp_path):
    agent = {"name": "a", "model": str(tiny_model), "mode": "zero_shot"}
    base = config.build(EvalConfig, {"data": str(sample), "agents": [agent]})
    other_strategy = config.build(EvalConfig, {"data": str(sample), "agents": [{**agent, "strategy": "generate"}]})
    taxonomy = tmp_path / "taxonomy.yaml"
    taxonomy.write_text(Path(load_taxonomy().source).read_text() + "\n# a different file\n")
    ids = [
        resolve_agents(base, "d", load_taxonomy())[0].run_id,
        resolve_agents(other_strategy, "d", load_taxonomy())[0].run_id,
        resolve_agents(base, "d", load_taxonomy(taxonomy))[0].run_id,
    ]
    assert len(set(ids)) == 3
    assert resolve_agents(base, "d", load_taxonomy())[0].run_id == ids[0]  # and it is stable


def test_final_predictions_must_hold_exactly_the_planned_tasks(tmp_path):
    store = PredictionStore(location(tmp_path, "output_dir"), "a-1")
    row = {name: "x" for name in COLUMNS} | {"hard": False, "latency_ms": 1.0, "prompt_tokens": 5, "scores": None}
    store.add(pd.DataFrame([{**row, "task_id": "t1"}, {**row, "task_id": "t2"}]))
    problem = f"{tmp_path / 'a-1'}: predictions do not match the planned tasks ({{}}); re-run to complete them"
    with pytest.raises(HarnessError) as missing:
        store.finalize({"t1", "t2", "t3"})
    assert str(missing.value) == problem.format("1 missing, first ['t3']; 0 unplanned, first []")
    with pytest.raises(HarnessError) as unplanned:  # a part from another plan (say, a larger max_tasks)
        store.finalize({"t1"})
    assert str(unplanned.value) == problem.format("0 missing, first []; 1 unplanned, first ['t2']")
    assert not store.finished
    store.finalize({"t1", "t2"})
    assert store.finished and list(store.read().task_id) == ["t1", "t2"]
