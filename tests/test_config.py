import re
from pathlib import Path

import pytest

from harness.core import config
from harness.core.errors import ConfigError
from harness.train.config import TrainConfig


def test_yaml_and_overrides(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("run_name: a\nepochs: 2\ndesign: {spelling: text}\nlora: {enabled: true}\n")
    cfg = config.load(TrainConfig, path, ["epochs=5", "design.granularity=category", "learning_rate=1e-4"])
    assert (cfg.run_name, cfg.epochs, cfg.learning_rate) == ("a", 5, 1e-4)
    assert cfg.design.name == "category-text-assistant-phrase"
    assert cfg.lora.enabled and cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.mark.parametrize(
    "text, overrides, needle",
    [
        ("epochs: 2\nlearning_rat: 0.1\n", [], "c.yaml: learning_rat: unknown key"),
        ("deepspeed: {zero: 2}\n", [], "c.yaml: deepspeed.zero: unknown key"),
        ("epochs: two\n", [], "c.yaml: epochs: expected int, got 'two'"),
        ("design: {spelling: emoji}\n", [], "design.spelling: 'emoji' is not one of"),
        ("mode: dpo\n", [], "mode: 'dpo' is not one of"),
        ("", ["deepspeed.zero_stage=4"], "zero_stage: 4 is not 0, 1, 2 or 3"),
        ("", ["epochs"], "expected key=value"),
        ("lora: [1]\n", [], "c.yaml: lora: expected a mapping"),
        (
            "epochs: 2\nlora: {enabled: true\n",
            [],
            "c.yaml: cannot read config: not valid YAML at line 3, column 1: expected ','",
        ),
        ("- 1\n", ["epochs=2"], "c.yaml: expected a mapping, got [1]"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, text, overrides, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(TrainConfig, path, overrides)
    assert needle in str(info.value)


def test_config_errors_are_one_line(tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        config.load(TrainConfig, tmp_path / "missing.yaml")
    assert str(info.value) == f"{tmp_path / 'missing.yaml'}: cannot read config: No such file or directory"
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 2\n\tlora: {}\n")
    with pytest.raises(ConfigError) as info:
        config.load(TrainConfig, path)
    problem = "not valid YAML at line 2, column 1: found character '\\t' that cannot start any token"
    assert str(info.value) == f"{path}: cannot read config: {problem}"


def test_demo_gpu_settings_build_and_a_cluster_without_gpu_is_refused(ray_local):
    from harness.cli.demo import CONFIGS, PROFILES, PipelineConfig, require_gpu, sharing_one_gpu, step_config
    from harness.evaluate.config import EvalConfig

    gpu_profiles = [profile for profile in PROFILES.values() if profile.gpu_train is not None]
    assert gpu_profiles
    for profile in gpu_profiles:
        train = step_config(TrainConfig, CONFIGS / profile.train_config, {"data": "x.jsonl", **profile.gpu_training()})
        assert train.use_gpu and train.resources_per_worker["GPU"] == 1 and train.max_train_tasks is None
        evaluation = sharing_one_gpu(step_config(EvalConfig, CONFIGS / profile.eval_config, profile.gpu_eval))
        assert evaluation.max_tasks is None
        assert sum(agent.num_gpus for agent in evaluation.agents) == pytest.approx(1.0)
    with pytest.raises(
        ValueError, match=r"^gpu: profile 'tiny' runs on CPU \(its sweep\); GPU profiles: \['smollm2'\]$"
    ):
        PipelineConfig(gpu=True)
    with pytest.raises(ConfigError, match=r"^gpu: the Ray cluster has 2 CPU, 0 GPU; a GPU training worker needs 4 CPU"):
        require_gpu()  # the suite's Ray has CPUs only: training would wait for a GPU forever


REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "harness" / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_shipped_config_opens_with_the_command_that_runs_it_and_loads(path: Path):
    from harness.evaluate.config import EvalConfig
    from harness.train.sweep import SweepConfig

    command = path.read_text().splitlines()[0]
    relative = path.relative_to(REPO)  # run from the repository root, as the README says
    kinds = {"train": TrainConfig, "sweep": SweepConfig, "eval": EvalConfig}
    verb = command.removeprefix("# harness ").split()[0]
    assert command == f"# harness {verb} -c {relative.as_posix()}" and verb in kinds
    config.load(kinds[verb], path)  # what the command reads first


def test_the_configs_are_one_directory():
    assert len(SHIPPED) == 6 and not (REPO / "jobs" / "configs").exists()


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "use_gpu", "expected"),
    [
        (False, False, False, "float32"),  # AVX2 only: bf16 would be emulated
        (True, False, False, "bfloat16"),
        (False, True, False, "bfloat16"),
        (False, False, True, "bfloat16"),
    ],
)
def test_bfloat16_if_native_falls_back_to_float32_where_bf16_is_emulated(
    monkeypatch, amx, avx512_bf16, use_gpu, expected
):
    import torch

    from harness.agents.loading import torch_dtype
    from harness.train.config import deepspeed_config

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert torch_dtype("bfloat16_if_native", use_gpu) == getattr(torch, expected)
    assert torch_dtype("auto", use_gpu=False) == torch.float32 and torch_dtype("bfloat16", False) == torch.bfloat16
    cfg = config.load(TrainConfig, None, [f"use_gpu={str(use_gpu).lower()}", "model.dtype=bfloat16_if_native"])
    assert deepspeed_config(cfg, world_size=1, total_steps=10)["bf16"]["enabled"] == use_gpu


def test_no_shipped_config_asks_for_bfloat16_unconditionally():
    # Plain bfloat16 took 4.4x float32's time per SmolLM2 forward on an AVX2-only CPU.
    assert SHIPPED and not [p.name for p in SHIPPED if re.search(r"dtype:\s*bfloat16(?!\w)", p.read_text())]
