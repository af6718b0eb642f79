from pathlib import Path

import pytest

from harness.core import config
from harness.core.errors import ConfigError
from harness.train.sweep import SweepConfig, param_space


def sweep_values(sample: Path, tiny_model: Path, tmp_path: Path) -> dict:
    """A sweep of two token designs with sampled warmups, two trials at a time (the two-node test runs it)."""
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


def test_search_space_errors_name_the_key(sample, tiny_model, tmp_path):
    values = sweep_values(sample, tiny_model, tmp_path)
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
