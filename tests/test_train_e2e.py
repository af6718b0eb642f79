"""Real Ray Train + DeepSpeed runs of the tiny model on CPU (gloo)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import config
from harness.bench import load_taxonomy
from harness.model import ModelSettings, load_model, load_tokenizer
from harness.tokens import TokenDesign
from harness.train import TrainConfig, train

pytestmark = pytest.mark.slow


def _overrides(sample: Path, tiny_model: Path, storage: Path, name: str) -> list[str]:
    return [
        f"run_name={name}",
        f"data={sample}",
        f"model.name_or_path={tiny_model}",
        f"storage_path={storage}",
        "batch_size=16",
        "max_length=320",
        "eval_max_tasks=64",
        "log_every=5",
        "max_failures=0",
    ]


def test_two_worker_zero2_run_lowers_loss(sample, tiny_model, tmp_path, ray_local):
    extra = ["num_workers=2", "deepspeed.zero_stage=2", "epochs=3", "learning_rate=0.003"]
    cfg = config.load(TrainConfig, None, _overrides(sample, tiny_model, tmp_path, "zero2") + extra)
    result = train(cfg)
    metrics = result.metrics
    assert metrics["completed"] and metrics["dev_loss"] < 0.6 * metrics["initial_dev_loss"], metrics
    assert (result.final_model / "model.safetensors").exists()
    assert TokenDesign.load(result.final_model) == cfg.design
    tokenizer = load_tokenizer(str(result.final_model))
    assert tokenizer.convert_tokens_to_ids("<behavior:proactive>") == len(tokenizer) - 1


def test_killed_lora_run_resumes_and_its_adapter_reloads(sample, tiny_model, tmp_path):
    args = [
        sys.executable,
        "-m",
        "harness.cli",
        "train",
        *_overrides(sample, tiny_model, tmp_path, "resume"),
        "num_workers=1",
        "deepspeed.zero_stage=1",
        "epochs=2",
        "checkpoint_every=4",
        "keep_checkpoints=3",
        "lora.enabled=true",
        "learning_rate=0.01",
    ]
    run_dir = tmp_path / "resume"
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while not list(run_dir.glob("checkpoint_*/model/adapter_config.json")) and time.time() < deadline:
        assert first.poll() is None, first.stdout.read().decode()[-3000:]
        time.sleep(1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (run_dir / "final").exists(), "the run was meant to die before it finished"

    second = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    output = second.stdout + second.stderr
    resumed_at = int(output.split("[harness] resuming resume at epoch ")[1].split("step ")[1].split()[0])
    assert resumed_at >= 4
    metrics = json.loads((run_dir / "final_metrics.json").read_text())
    rows = sum(1 for line in sample.read_text().splitlines() if '"split": "train"' in line)
    assert metrics["completed"] and metrics["step"] == 2 * -(-rows // 16)
    assert metrics["dev_loss"] < metrics["initial_dev_loss"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = sorted(run_dir.glob("checkpoint_epoch*"))[-1] / "model"
    assert (adapter_dir / "adapter_config.json").exists()
    tokenizer = load_tokenizer(str(adapter_dir))
    base = load_model(ModelSettings(str(tiny_model)))
    TokenDesign.load(adapter_dir).apply(tokenizer, base, load_taxonomy())
    reloaded = PeftModel.from_pretrained(base, adapter_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
    ids = torch.tensor(
        [tokenizer("Dr. Reyes: Please draft the order for amoxicillin <behavior:proactive>")["input_ids"]]
    )
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
