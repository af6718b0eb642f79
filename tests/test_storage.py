import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.agents.references import local_or_hub
from harness.core import storage
from harness.core.config import load
from harness.core.errors import ConfigError
from harness.evaluate.config import EvalConfig
from harness.train.layout import trained_model

REPO = Path(__file__).resolve().parents[1]


def test_relative_paths_resolve_against_the_root_and_uris_stay_uris(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.ROOT_ENV, str(tmp_path))
    assert storage.resolve("artifacts/runs") == str(tmp_path / "artifacts" / "runs")
    assert storage.resolve("/abs/data.jsonl") == "/abs/data.jsonl"
    assert storage.resolve("s3://bucket/runs") == "s3://bucket/runs"
    assert storage.resolve("gs://bucket/a/../b") == "gs://bucket/a/../b"
    monkeypatch.setenv(storage.ROOT_ENV, "s3://bucket/bbench/")
    assert storage.resolve("artifacts/runs") == "s3://bucket/bbench/artifacts/runs"
    assert storage.resolve("/mnt/nfs/data") == "/mnt/nfs/data"
    monkeypatch.delenv(storage.ROOT_ENV)
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("results/lb.parquet") == str(tmp_path / "results" / "lb.parquet")


def test_rooted_resolves_every_path_key_of_a_config_and_leaves_model_references(tmp_path, monkeypatch):
    monkeypatch.setenv(storage.ROOT_ENV, str(tmp_path))
    cfg = storage.rooted(load(EvalConfig, REPO / "harness" / "configs" / "eval.yaml", ["output_dir=s3://b/eval"]))
    assert cfg.data == str(tmp_path / "artifacts" / "data" / "tasks.jsonl")
    assert cfg.runs_dir == str(tmp_path / "artifacts" / "runs")
    assert cfg.leaderboard == str(tmp_path / "results" / "leaderboard.parquet")
    assert cfg.output_dir == "s3://b/eval"
    assert [a.model for a in cfg.agents][:3] == ["tiny-qwen2", "tiny-qwen2", "run:sft-tiny"]


def test_a_missing_local_model_is_one_line_never_a_hub_id(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setenv(storage.ROOT_ENV, str(tmp_path))
    with pytest.raises(ConfigError) as error:
        local_or_hub("artifacts/tiny-qwen2", "model")  # no artifacts/ at all under the root: still a local path
    assert "artifacts/tiny-qwen2" in str(error.value) and str(tmp_path) in str(error.value)
    assert "\n" not in str(error.value)
    assert local_or_hub("Qwen/Qwen2.5-7B-Instruct", "model") == "Qwen/Qwen2.5-7B-Instruct"
    shutil.copytree(tiny_model, tmp_path / "artifacts" / "tiny-qwen2")
    assert local_or_hub("artifacts/tiny-qwen2", "model") == str(tmp_path / "artifacts" / "tiny-qwen2")
    (tmp_path / "org").mkdir()
    with pytest.raises(ConfigError):
        local_or_hub("org/model", "model")  # `org` is a directory under the root: a local path that is missing


def _job(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / script), *args], cwd=cwd, capture_output=True, text=True)


def test_a_job_entrypoint_takes_the_root_and_refuses_what_is_missing_on_the_driver(tmp_path, sample):
    (tmp_path / "artifacts" / "data").mkdir(parents=True)
    shutil.copy(sample, tmp_path / "artifacts" / "data" / "tasks.jsonl")
    config = REPO / "harness" / "configs" / "eval.yaml"
    run = _job("evaluate.py", "--root", str(tmp_path), "--config", str(config), cwd=tmp_path.parent)
    assert (run.returncode, run.stderr) == (
        1,
        f"error: agent zero-shot: model: tiny-qwen2 is neither a model in {tmp_path / 'artifacts' / 'models'}, an "
        f"existing directory ({tmp_path / 'tiny-qwen2'}: relative paths resolve against $HARNESS_ROOT, else the "
        "current directory) nor a hub id like org/name (run `harness model make-tiny` for tiny-qwen2; packaged "
        "models: smollm2)\n",
    )

    run = _job("evaluate.py", "--config", str(config), cwd=tmp_path.parent)  # no root: the data is not there
    no_data = tmp_path.parent / "artifacts" / "data" / "tasks.jsonl"
    assert (run.returncode, run.stderr) == (1, f"error: {no_data}: no such file or directory\n")

    nowhere = tmp_path / "nowhere"
    run = _job("train.py", f"--root={nowhere}", cwd=tmp_path)
    assert (run.returncode, run.stdout) == (1, f"error: --root {nowhere}: no such directory on this node\n")


def test_the_leaderboard_job_reads_under_the_root(tmp_path):
    board = tmp_path / "results" / "leaderboard.parquet"
    run = _job("leaderboard.py", "show", "--root", str(tmp_path), cwd=REPO)
    assert (run.returncode, run.stderr) == (1, f"error: {board}: no leaderboard yet (run `harness eval` first)\n")


def test_run_and_sweep_references_resolve_under_the_runs_root_and_never_as_a_local_uri(tmp_path, tiny_model):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_model, runs / "r1" / "final")
    assert trained_model("run:r1", runs) == str(runs / "r1" / "final")
    best = runs / "sweeps" / "s1" / "best.json"
    best.parent.mkdir(parents=True)
    best.write_text('{"final_model": "/elsewhere/final"}')
    assert trained_model("sweep:s1:best", runs) == "/elsewhere/final"
    for reference, problem in (("run:../r1", "not a valid name"), ("run:r2", "no finished training run")):
        with pytest.raises(ConfigError, match=problem):
            trained_model(reference, runs)
    with pytest.raises(ConfigError, match="no finished sweep at"):
        trained_model("sweep:s2:best", runs)


def test_a_cached_copy_is_fetched_once_whole_or_not_at_all_and_a_concurrent_finished_copy_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    fetches: list[Path] = []

    def fetch(into: Path) -> None:
        fetches.append(into)
        (into / "weights").write_text("mine")

    first = storage.cached_copy("models", "s3://b/m|1", fetch)
    assert storage.cached_copy("models", "s3://b/m|1", fetch) == first
    assert len(fetches) == 1 and (first / "weights").read_text() == "mine"
    assert storage.cached_copy("models", "s3://b/m|2", fetch) != first  # a changed stamp is a new copy

    def broken(into: Path) -> None:
        (into / "weights").write_text("half")
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        storage.cached_copy("data", "s3://b/d|1", broken)
    assert list((tmp_path / "cache" / "data").iterdir()) == []  # no partial copy, no temporary left

    def overtaken(into: Path) -> None:  # another process on this node renames its copy in first
        target = into.with_name(into.name.split(".")[1])
        target.mkdir()
        (target / "weights").write_text("theirs")
        (into / "weights").write_text("mine")

    won = storage.cached_copy("data", "s3://b/d|2", overtaken)
    assert (won / "weights").read_text() == "theirs"
    assert [p.name for p in won.parent.iterdir()] == [won.name]
