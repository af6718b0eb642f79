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
TRAIN_TASKS = 96  # the killed LoRA run's: two epochs of 6 steps, checkpoints at steps 4, 8 and 12


def _mlflow_run(mlruns: Path, name: str):
    """A client of the MLflow file store `mlruns` and the one run named `name` in its experiment "train"."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlruns.as_uri())
    experiment = client.get_experiment_by_name("train")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'")
    assert len(runs) == 1, [r.info for r in runs]
    return client, runs[0]


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
    cfg = config.load(TrainConfig, None, _overrides(sample, tiny_model, tmp_path / "runs", "zero2") + extra)
    reports = []  # what the driver shows while the run trains, read from rank 0's progress file
    result = train(cfg, progress=lambda *report: reports.append(report))
    metrics = result.metrics
    steps = [step for _, step, *_ in reports]
    assert {run for run, *_ in reports} == {"zero2"} and steps == sorted(steps)
    assert reports[-1][1:3] == (metrics["step"], metrics["step"]) and reports[-1][3]["loss"] == metrics["loss"]
    # 0.603 on this sample since it gained temporal_ordering and lost question_answering (was below 0.6 before)
    assert metrics["completed"] and metrics["dev_loss"] < 0.65 * metrics["initial_dev_loss"], metrics
    assert (result.final_model / "model.safetensors").exists()
    parameters = sum(p.numel() for p in load_model(ModelSettings(str(result.final_model))).parameters())
    assert metrics["achieved_flops_per_s"] == pytest.approx(6 * parameters * metrics["tokens_per_s"])
    assert "mfu" not in metrics  # no peak FLOP/s on CPU
    record = json.loads((result.run_dir / "run_record.json").read_text())
    assert record["batch"]["global_batch_size"] == 32 and record["seeds"] == {"seed": 0}

    client, run = _mlflow_run(tmp_path / "mlruns", "zero2")  # the default store: mlruns beside the runs root
    assert run.info.status == "FINISHED" and run.data.tags["final_model"] == str(result.final_model)
    assert (run.data.params["design.name"], run.data.params["num_workers"]) == (cfg.design.name, "2")
    loss_steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert len(loss_steps) >= 3 and sorted(loss_steps) == loss_steps and loss_steps[-1] == metrics["step"]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"final_metrics.json", "run_record.json"}
    assert TokenDesign.load(result.final_model) == cfg.design
    tokenizer = load_tokenizer(str(result.final_model))
    assert tokenizer.convert_tokens_to_ids("<behavior:proactive>") == len(tokenizer) - 1


def test_killed_lora_run_resumes_and_its_adapter_reloads(sample, tiny_model, tmp_path):
    args = [
        sys.executable,
        "-m",
        "harness.cli",
        "--verbose",  # the worker's "[harness] resuming ..." line reaches the terminal too, not only the log file
        "train",
        *_overrides(sample, tiny_model, tmp_path / "runs", "resume"),
        "num_workers=1",
        "deepspeed.zero_stage=1",
        "epochs=2",
        "checkpoint_every=4",
        "keep_checkpoints=3",
        "lora.enabled=true",
        "learning_rate=0.01",
        f"max_train_tasks={TRAIN_TASKS}",
        "eval_max_tasks=32",
    ]
    run_dir = tmp_path / "runs" / "resume"
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
    assert metrics["completed"] and metrics["step"] == 2 * -(-TRAIN_TASKS // 16)
    assert metrics["dev_loss"] < metrics["initial_dev_loss"]
    client, run = _mlflow_run(tmp_path / "mlruns", "resume")  # one run: the resumed run continued the killed one's
    assert run.info.run_id == json.loads((run_dir / "tracking.json").read_text())["run_id"]
    assert run.info.status == "FINISHED"
    dev_steps = [m.step for m in client.get_metric_history(run.info.run_id, "dev_loss")]
    assert min(dev_steps) <= resumed_at < max(dev_steps) == metrics["step"], dev_steps

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
