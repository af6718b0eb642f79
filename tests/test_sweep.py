import json
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness import config, leaderboard
from harness.errors import ConfigError
from harness.evaluate import EvalConfig, evaluate
from harness.pipeline import CONFIGS, step_config, training_values
from harness.selection import Mode
from harness.sweep import SweepConfig, param_space, sweep
from harness.train import TrainConfig
from harness.train_config import CONFIG_FILE


def _values(sample: Path, tiny_model: Path, tmp_path: Path) -> dict:
    return {
        "name": "t",
        "runs_dir": str(tmp_path / "runs"),
        "scheduler": {"type": "fifo"},
        "max_concurrent_trials": 2,
        "search_space": {"design.spelling": {"grid": ["special", "text"]}, "warmup_ratio": {"uniform": [0.1, 0.3]}},
        "train": {
            "data": str(sample),
            "model": {"name_or_path": str(tiny_model)},
            "epochs": 2,
            "batch_size": 16,
            "learning_rate": 0.004,
            "max_length": 320,
            "max_train_tasks": 96,
            "eval_max_tasks": 32,
            "log_every": 1000000,
            "num_workers": 1,
            "max_failures": 0,
        },
    }


def _written_since(root: Path, since: float) -> list[Path]:
    """The files and directories under `root` changed since `since` (none when `root` is missing)."""
    return [path for path in root.rglob("*") if path.stat().st_mtime >= since] if root.exists() else []


def test_search_space_errors_name_the_key(sample, tiny_model, tmp_path):
    values = _values(sample, tiny_model, tmp_path)
    values["search_space"] = {"design.spelling": {"grid": ["special", "emoji"]}}
    with pytest.raises(ConfigError, match=r"search_space.design.spelling='emoji'.*not one of"):
        config.build(SweepConfig, values)
    values["search_space"] = {"lerning_rate": {"grid": [0.1]}}
    with pytest.raises(ConfigError, match="lerning_rate: unknown key"):
        config.build(SweepConfig, values)
    values["search_space"] = {"learning_rate": {"normal": [0.1]}}
    with pytest.raises(ConfigError, match="expected one of"):
        config.build(SweepConfig, values)
    values["search_space"] = {"learning_rate": {"loguniform": ["1e-4", 1e-2]}}  # YAML 1.1 reads 1e-4 as a string
    space = param_space(config.build(SweepConfig, values))
    assert type(space["train"]["learning_rate"]).__name__ == "Float"
    assert (space["train"]["learning_rate"].lower, space["train"]["learning_rate"].upper) == (1e-4, 1e-2)


@pytest.mark.slow
def test_sweep_of_two_designs_with_sampled_warmups_carries_every_searched_key_into_training(
    sample, tiny_model, tmp_path, ray_local
):
    cfg = config.build(SweepConfig, _values(sample, tiny_model, tmp_path))
    started = time.time()
    table = sweep(cfg)
    stored = pd.read_parquet(cfg.directory / "trials.parquet")
    assert len(stored) == 2 and set(stored.status) == {"finished"}
    assert sorted(stored["design.spelling"]) == ["special", "text"]
    assert stored.warmup_ratio.between(0.1, 0.3).all() and stored.warmup_ratio.nunique() == 2
    for _, trial in stored.iterrows():  # each trial trained with what the table says it searched
        trained = yaml.safe_load((Path(trial.final_model).parent / CONFIG_FILE).read_text())
        searched = (trial["design.spelling"], trial.warmup_ratio)
        assert (trained["design"]["spelling"], trained["warmup_ratio"]) == searched
    assert stored.dev_macro_f1.between(0, 1).all() and stored.final_model.str.len().gt(0).all()
    assert list(stored.dev_macro_f1) == sorted(stored.dev_macro_f1, reverse=True)
    assert table.trial_id.tolist() == stored.trial_id.tolist()
    # Both trials trained at once on the 2 CPUs (a trial's driver reserves none, each trial's one worker one):
    # the later trial's worker wrote its run record before the earlier trial finished.
    runs = {trial: cfg.directory / "trials" / trial for trial in stored.trial_id}
    began = {trial: (run / "run_record.json").stat().st_mtime for trial, run in runs.items()}
    first, second = sorted(began, key=began.get)
    assert began[second] < (runs[first] / "final_metrics.json").stat().st_mtime
    tracked = cfg.directory / "mlruns"  # beside the trials, never in the working directory
    names = {path.read_text() for path in tracked.glob("*/*/tags/mlflow.runName")}
    assert names == set(stored.trial_id) and not _written_since(Path.cwd() / "mlruns", started)
    experiments = [path.read_text() for path in tracked.glob("*/meta.yaml")]
    assert sum("name: sweep-t" in meta for meta in experiments) == 1  # made once, before the concurrent trials

    again = sweep(cfg)  # a restarted sweep restores instead of training again
    assert sorted(again.trial_id) == sorted(stored.trial_id)

    best = json.loads((cfg.directory / "best.json").read_text())
    assert best["searched"] == {"design.spelling": stored["design.spelling"][0], "warmup_ratio": stored.warmup_ratio[0]}
    for mode in (Mode.BEHAVIORSFT, Mode.SFT):  # what the main job trains after the sweep
        follow = step_config(TrainConfig, CONFIGS / "behaviorsft.yaml", training_values(mode, "after", best))
        assert follow.warmup_ratio == best["searched"]["warmup_ratio"] != TrainConfig().warmup_ratio
        assert follow.design.spelling == best["searched"]["design.spelling"] and follow.mode is mode

    evaluation = config.build(
        EvalConfig,
        {
            "data": str(sample),
            "max_tasks": 16,
            "bootstrap": 50,
            "answers": False,
            "runs_dir": str(tmp_path / "runs"),
            "output_dir": str(tmp_path / "eval"),
            "leaderboard": str(tmp_path / "lb.parquet"),
            "agents": [{"name": "best-design", "model": "sweep:t:best", "mode": "behaviorsft", "num_cpus": 0.5}],
        },
    )
    leaderboard.append(evaluation.leaderboard, evaluate(evaluation).metrics)
    ranking = leaderboard.ranking(leaderboard.read(evaluation.leaderboard))
    assert ranking.agent.tolist() == ["best-design"]
    assert ranking.design.iloc[0] == stored.design.iloc[0]
