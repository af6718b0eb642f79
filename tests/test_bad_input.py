"""Bad input gets one line naming the file, the line or key and the field, a non-zero exit, and nothing lost.

The CLI tests run `python -m harness.cli` in a fresh directory and check that no file outside the test's
temporary directory changed (the checkout and the working directory are snapshotted).
"""

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from harness.agents.making import write_model_dir
from harness.cli.main import run
from harness.core import config
from harness.core.errors import ConfigError, DataError
from harness.core.files import write_atomic, write_text
from harness.data.io import load_dataset, load_tasks, validate
from harness.data.mini import write_sample
from harness.data.taxonomy import load_taxonomy
from harness.train.config import TrainConfig
from harness.train.sweep import SweepConfig

from .conftest import BAD_DIR

ROOT = Path(__file__).resolve().parents[1]
CACHES = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}
NAMES = "(letters, digits, '.', '_' or '-', starting with a letter or digit, at most 128 characters, no '..')"


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` (caches left out) with its size and modification time."""
    files = {}
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in CACHES]
        for name in names:
            stat = os.stat(os.path.join(directory, name), follow_symlinks=False)
            files[os.path.relpath(os.path.join(directory, name), root)] = (stat.st_size, stat.st_mtime_ns)
    return files


def _harness(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in an empty directory under `tmp_path`; assert it changed no file but the ones under tmp_path."""
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    before = _listing(ROOT)
    run = subprocess.run(
        [sys.executable, "-m", "harness.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
    )
    assert _listing(ROOT) == before
    assert "Traceback" not in run.stderr + run.stdout
    return run


def _one_error_line(run: subprocess.CompletedProcess, message: str, code: int = 1) -> None:
    assert run.returncode == code
    assert run.stderr == f"error: {message}\n"


# 1. Bytes that are not UTF-8


def test_a_jsonl_line_that_is_not_utf8_is_one_bad_row_and_the_others_are_checked(tmp_path: Path):
    bad = BAD_DIR / "not_utf8.jsonl"
    result = validate(bad)
    assert result.problems == [
        f"{bad}:2: <row>: not UTF-8 text (byte 0xe9 at column 143)",
        f"{bad}:3: task_id: missing field",
    ]
    assert result.good_rows == 2
    rejects = tmp_path / "rejects.jsonl"
    frame = load_tasks(bad, skip_bad_rows=True, rejects_path=rejects)
    assert list(frame["task_id"]) == ["u-1", "u-4"]
    first = json.loads(rejects.read_text().splitlines()[0])
    assert first["source"] == f"{bad}:2"
    assert '"task_id": "u-2"' in first["row"] and "caf\\xe9 au lait?" in first["row"]  # the line, kept whole

    run = _harness(tmp_path, "data", "validate", str(bad))
    assert run.returncode == 1
    assert run.stdout.splitlines() == result.problems
    assert run.stderr == f"{bad}: 2 problem(s) in 2 row(s); 2 row(s) valid\n"
    assert not (tmp_path / "cwd" / "artifacts").exists()  # no log for a user error


def test_yaml_config_and_taxonomy_that_are_not_utf8(tmp_path: Path):
    bad_config = BAD_DIR / "not_utf8_config.yaml"
    message = f"{bad_config}: not UTF-8 text (byte 0xe9 at line 2, column 14)"
    with pytest.raises(ConfigError) as info:
        config.load(TrainConfig, bad_config)
    assert str(info.value) == message
    _one_error_line(_harness(tmp_path, "train", "--config", str(bad_config)), message)

    bad_taxonomy = BAD_DIR / "not_utf8_taxonomy.yaml"
    message = f"{bad_taxonomy}: not UTF-8 text (byte 0xab at line 3, column 14)"
    with pytest.raises(ConfigError) as info:
        load_taxonomy(bad_taxonomy)
    assert str(info.value) == message
    run = _harness(tmp_path, "data", "validate", str(BAD_DIR / "mixed.jsonl"), "--taxonomy", str(bad_taxonomy))
    _one_error_line(run, message)


def test_a_repeated_yaml_key_is_refused_not_resolved_to_the_last(tmp_path: Path):
    bad_config = BAD_DIR / "duplicate_key.yaml"
    message = f"{bad_config}: cannot read config: not valid YAML at line 4, column 1: duplicate key 'epochs'"
    _one_error_line(_harness(tmp_path, "train", "--config", str(bad_config)), message)


# 2. Parquet files that are not task tables

PARQUET = [
    (
        "truncated.parquet",
        "truncated or corrupt Parquet file (Parquet magic bytes not found in footer. Either the file is corrupted or "
        "this is not a parquet file.)",
    ),
    ("not_parquet.parquet", "not a Parquet file (it does not start with PAR1)"),
    (
        "predictions.parquet",
        "not a BehaviorBench task table: missing column(s) case_id, messages, split "
        "(it has task_id, agent, category, task_type, gold_behavior, pred_behavior)",
    ),
]


@pytest.mark.parametrize("name, problem", PARQUET)
def test_parquet_that_is_not_a_task_table_is_one_line(tmp_path: Path, name: str, problem: str):
    path = BAD_DIR / name
    for load in (validate, load_tasks, lambda p: load_dataset(p, skip_bad_rows=True, clean_dir=tmp_path)):
        with pytest.raises(DataError) as info:
            load(path)
        assert str(info.value) == f"{path}: {problem}"
    run = _harness(tmp_path, "data", "validate", str(path))
    assert (run.returncode, run.stdout, run.stderr) == (1, "", f"error: {path}: {problem}\n")
    assert list(tmp_path.iterdir()) == [tmp_path / "cwd"]  # no clean copy, no rejects


# 3. Overrides of string fields stay strings


@pytest.mark.parametrize(
    "override, expected",
    [
        ("run_name=2024", "2024"),
        ("run_name=1.50", "1.50"),
        ("run_name=true", "true"),
        ("run_name=2024-01-01", "2024-01-01"),
        ("run_name='0042'", "0042"),
        ("model.name_or_path=7", "7"),
    ],
)
def test_an_override_of_a_string_field_keeps_its_text(override: str, expected: str):
    cfg = config.load(TrainConfig, None, [override])
    key = override.split("=")[0]
    assert (cfg.model.name_or_path if key.startswith("model.") else cfg.run_name) == expected


def test_numbers_still_parse_and_none_stays_none():
    cfg = config.load(TrainConfig, None, ["epochs=5", "learning_rate=1e-4", "taxonomy=2024", "use_gpu=true"])
    assert (cfg.epochs, cfg.learning_rate, cfg.taxonomy, cfg.use_gpu) == (5, 1e-4, "2024", True)
    assert config.load(TrainConfig, None, ["taxonomy=null"]).taxonomy is None
    sweep = config.load(SweepConfig, None, ["name=2024", "train.run_name=7"])
    assert (sweep.name, sweep.train.run_name) == ("2024", "7")
    with pytest.raises(ConfigError, match=r"^override 'epochs=five': epochs: expected int, got 'five'$"):
        config.load(TrainConfig, None, ["epochs=five"])


def test_cli_keeps_a_numeric_run_name_a_string(tmp_path: Path):
    # Before the fix `run_name=2024` failed first ("expected str, got 2024"); now the next check speaks.
    _one_error_line(
        _harness(tmp_path, "train", "run_name=2024", "epochs=0"), "config: epochs: must be at least 1, got 0"
    )
    run = _harness(tmp_path, "train", "run_name=a: b: c")
    _one_error_line(
        run,
        "override 'run_name=a: b: c': the value is not valid YAML at line 1, column 5: "
        "mapping values are not allowed here",
    )


@pytest.mark.parametrize("case", yaml.safe_load((BAD_DIR / "configs.yaml").read_text()))
def test_bad_numbers_names_and_values_in_configs_are_one_line_before_anything_is_written(
    tmp_path: Path, monkeypatch, capsys, case: dict
):
    config_file = tmp_path / "eval.yaml"
    agent = {"name": "a", "model": "tiny-qwen2", "mode": "zero_shot"}
    config_file.write_text(yaml.safe_dump({"agents": [agent], **case.get("config", {})}).replace("{bad}", str(BAD_DIR)))
    args = ["--config", str(config_file)] if case["command"] == "eval" else case["overrides"]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = _listing(ROOT)
    assert run([case["command"], *args]) == 1
    error = case["error"].format(config=config_file, names=NAMES, bad=BAD_DIR)
    assert capsys.readouterr().err == f"error: {error}\n"
    assert _listing(ROOT) == before and list(cwd.iterdir()) == []


@pytest.mark.parametrize("case", yaml.safe_load((BAD_DIR / "results.yaml").read_text()))
def test_result_files_of_the_wrong_kind_or_content_are_one_line_and_nothing_is_written(
    tmp_path: Path, monkeypatch, capsys, case: dict
):
    monkeypatch.chdir(tmp_path)
    before = _listing(ROOT)
    args = [str(tmp_path / "out") if arg == "OUT" else arg.format(bad=BAD_DIR) for arg in case["args"]]
    assert run(args) == 1
    assert capsys.readouterr().err == f"error: {case['error'].format(bad=BAD_DIR)}\n"
    assert _listing(ROOT) == before and list(tmp_path.iterdir()) == []


# 4. Sweep search spaces and names


@pytest.mark.parametrize("case", yaml.safe_load((BAD_DIR / "search_spaces.yaml").read_text()))
def test_malformed_search_spaces_name_the_key(tmp_path: Path, case: dict):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"search_space": case["search_space"]}))
    with pytest.raises(ConfigError) as info:
        config.load(SweepConfig, path)
    assert str(info.value) == f"{path}: {case['error']}"


def test_cli_refuses_a_bad_search_space_and_a_bad_sweep_name_before_anything_is_created(tmp_path: Path):
    case = yaml.safe_load((BAD_DIR / "search_spaces.yaml").read_text())[2]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"search_space": case["search_space"], "runs_dir": str(tmp_path / "runs")}))
    _one_error_line(_harness(tmp_path, "sweep", "--config", str(path)), f"{path}: {case['error']}")
    bad_name = BAD_DIR / "sweep_bad_name.yaml"
    run = _harness(tmp_path, "sweep", "--config", str(bad_name))
    _one_error_line(run, f"{bad_name}: name: '../escaped' is not a valid name {NAMES}")
    run = _harness(tmp_path, "sweep", "name=../x", f"runs_dir={tmp_path / 'runs'}")
    _one_error_line(run, f"config: name: '../x' is not a valid name {NAMES}")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cwd", "sweep.yaml"]


def test_a_sweep_started_with_another_config_is_refused_naming_the_keys(tmp_path: Path):
    where = [f"runs_dir={tmp_path / 'runs'}", "name=s", f"train.data={tmp_path / 'd.jsonl'}"]
    started = config.load(SweepConfig, None, where)
    saved = started.files.config
    Path(saved.path).parent.mkdir(parents=True)
    saved.write_text(yaml.safe_dump(config.to_dict(started)))
    (tmp_path / "cwd").mkdir()
    before = sorted(tmp_path.rglob("*"))
    changed = ["num_samples=3", "train.learning_rate=0.1", "max_concurrent_trials=2"]  # the last: how it runs
    # A subprocess: the refusal comes from inside the command's captured console, which an in-process run would
    # leave bound to pytest's captured stdout.
    _one_error_line(
        _harness(tmp_path, "sweep", *where, *changed),
        f"sweep s: {saved} was made with another config (num_samples, train.learning_rate differ); choose "
        "another name, or restore those values to resume or reuse it",
    )
    assert sorted(tmp_path.rglob("*")) == before  # refused before Ray or Tune started


# 5. Unexpected errors: one line with the root cause, the traceback in a log

CRASHING_CLI = """
import sys
import time

from harness.cli.main import app, run


@app.command("boom")
def boom() -> None:
    try:
        {}["the missing key"]
    except KeyError as exc:
        raise RuntimeError("a wrapper that hides the cause") from exc


@app.command("wait")
def wait() -> None:
    print("ready", flush=True)
    time.sleep(600)


sys.exit(run(sys.argv[1:]))
"""


def _script(tmp_path: Path, text: str) -> Path:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(text))
    return script


def _log_line(stderr: str, root: str, log_dir: str) -> Path:
    match = re.fullmatch(
        rf"error: {re.escape(root)} \(full traceback: ({re.escape(log_dir)}/harness-\S+\.log)\)\n", stderr
    )
    assert match, stderr
    return Path(match.group(1))


def test_an_unexpected_error_is_one_line_with_its_root_cause_and_a_log(tmp_path: Path):
    script = _script(tmp_path, CRASHING_CLI)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "HARNESS_LOG_DIR"} | {"PYTHONPATH": str(ROOT)}
    before = _listing(ROOT)
    run = subprocess.run([sys.executable, str(script), "boom"], cwd=cwd, env=env, capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    log = _log_line(run.stderr, "KeyError: 'the missing key'", "artifacts/logs")
    text = (cwd / log).read_text()
    assert text.startswith("Traceback") and "RuntimeError: a wrapper that hides the cause" in text
    assert "which was caused by:" in text and text.rstrip().endswith("KeyError: 'the missing key'")

    logs = tmp_path / "elsewhere" / "logs"
    run = subprocess.run(
        [sys.executable, str(script), "boom"],
        cwd=cwd,
        env={**env, "HARNESS_LOG_DIR": str(logs)},
        capture_output=True,
        text=True,
    )
    assert _log_line(run.stderr, "KeyError: 'the missing key'", str(logs)).parent == logs
    assert len(list((cwd / "artifacts" / "logs").iterdir())) == 1  # the first run's log only
    assert _listing(ROOT) == before


def test_ctrl_c_is_one_line_and_exit_130(tmp_path: Path):
    script = _script(tmp_path, CRASHING_CLI)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        [sys.executable, str(script), "wait"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # Ctrl-C as in a terminal, also when the suite runs in the background of a shell without job control,
        # whose commands inherit SIGINT ignored (Python then never raises KeyboardInterrupt).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    ) as process:
        assert process.stdout.readline() == b"ready\n"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert stderr.decode() == "error: interrupted\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["script.py"]


RAY_CLI = """
import sys

import ray
import ray.train
from ray import tune
from ray.train.torch import TorchTrainer

from harness.cli.main import app, run
from harness.core.errors import DataError


@ray.remote
def fails() -> None:
    raise ValueError("bad value in a task")


@ray.remote
def refuses() -> None:
    raise DataError(["f.jsonl:3: task_id: missing field"], "f.jsonl: 1 problem(s) in 1 row(s)")


@ray.remote
class Worker:
    def work(self) -> None:
        raise ZeroDivisionError("division by zero in an actor")


def trial(config: dict) -> None:
    raise LookupError("no such thing in a trial")


def train_loop() -> None:
    raise OverflowError("too big in a training worker")


@app.command("task")
def task() -> None:
    ray.get(fails.remote())


@app.command("user-error")
def user_error() -> None:
    ray.get(refuses.remote())


@app.command("actor")
def actor() -> None:
    ray.get(Worker.remote().work.remote())


@app.command("tune")
def tune_trial() -> None:
    storage = sys.argv[1]
    results = tune.Tuner(trial, run_config=tune.RunConfig(name="t", storage_path=storage)).fit()
    raise results[0].error


@app.command("train")
def train() -> None:
    storage = sys.argv[1]
    run_config = ray.train.RunConfig(name="r", storage_path=storage)
    TorchTrainer(train_loop, scaling_config=ray.train.ScalingConfig(num_workers=1), run_config=run_config).fit()


ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
for command in sys.argv[2:]:
    print(f"--- {command}", file=sys.stderr, flush=True)
    print(command, run([command]), flush=True)
"""


@pytest.mark.slow
def test_errors_raised_inside_ray_reach_the_user_as_one_line(tmp_path: Path):
    """Run under `flock /tmp/heavy.lock`: it starts Ray."""
    script = _script(tmp_path, RAY_CLI)
    logs = tmp_path / "logs"
    roots = {
        "task": "ValueError: bad value in a task",
        "actor": "ZeroDivisionError: division by zero in an actor",
        "train": "OverflowError: too big in a training worker",
        "tune": "LookupError: no such thing in a trial",
    }
    commands = ["user-error", *roots]
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "storage"), *commands],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HARNESS_LOG_DIR": str(logs)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert [line for line in run.stdout.splitlines() if line.split(" ")[0] in commands] == [
        f"{command} 1" for command in commands
    ]
    printed = dict(re.findall(r"^--- (\S+)\n(.*?)(?=^--- |\Z)", run.stderr, flags=re.M | re.S))
    # A user error raised in a Ray worker is printed as itself (a DataError keeps its problem lines).
    assert printed["user-error"] == "error: f.jsonl: 1 problem(s) in 1 row(s)\nf.jsonl:3: task_id: missing field\n"
    for command, root in roots.items():
        lines = printed[command].splitlines()
        if command != "tune":  # Tune itself logs a failed trial (with its traceback) before fit() returns
            assert len(lines) == 1, printed[command]
        log = _log_line(lines[-1] + "\n", root, str(logs))
        text = log.read_text()
        assert text.startswith("Traceback") and text.rstrip().endswith(root)


# 6. Atomic writes survive crashes

KILLED_WRITER = """
import os
import signal
import sys
from pathlib import Path

from harness.core.files import write_atomic


def write_then_die(tmp: Path) -> None:
    tmp.write_text("half of the new")
    os.kill(os.getpid(), signal.SIGKILL)


write_atomic(Path(sys.argv[1]), write_then_die)
"""


def test_a_killed_writer_leaves_the_old_file_and_the_next_write_removes_only_its_temp(tmp_path: Path):
    target = tmp_path / "results" / "table.json"
    write_text(target, "old")
    script = _script(tmp_path, KILLED_WRITER)
    run = subprocess.run([sys.executable, str(script), str(target)], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == -signal.SIGKILL
    assert target.read_text() == "old"
    (stale,) = [p for p in target.parent.iterdir() if p != target]
    assert re.fullmatch(r"\.table\.json\.[0-9a-f]{32}\.tmp", stale.name) and stale.read_text() == "half of the new"

    others = [".table.json.notours.tmp", ".table.json.0123.tmp", f".other.json.{'a' * 32}.tmp", "table.json.bak"]
    for name in others:
        (target.parent / name).write_text("not ours")
    live = target.parent / f".table.json.{'b' * 32}.tmp"
    live.write_text("being written")
    lock = os.open(live, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as a writer that is still running holds it
    try:
        write_text(target, "new")
    finally:
        os.close(lock)
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([*others, live.name, "table.json"])


KILLED_DOWNLOAD = """
import os
import signal

from harness.core import storage


def download_then_die(tmp):
    (tmp / "weights").write_text("half")
    os.kill(os.getpid(), signal.SIGKILL)


storage.cached_copy("models", "s3://bucket/model|1", download_then_die)
"""


def test_the_next_copy_removes_the_directory_a_killed_download_left_and_keeps_a_live_one(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HARNESS_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, str(_script(tmp_path, KILLED_DOWNLOAD))], env=env)
    assert run.returncode == -signal.SIGKILL
    (stale,) = (tmp_path / "cache" / "models").iterdir()
    assert (stale / "weights").read_text() == "half"
    live = stale.with_name(re.sub(r"[0-9a-f]{32}", "b" * 32, stale.name))
    live.mkdir()
    lock = os.open(live, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as a download that is still running holds it
    try:
        copy = subprocess.run(
            [
                sys.executable,
                "-c",
                "from harness.core import storage; print(storage.cached_copy('models', "
                "'s3://bucket/model|1', lambda tmp: (tmp / 'weights').write_text('whole')))",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        os.close(lock)
    copied = Path(copy.stdout.strip())
    assert (copied / "weights").read_text() == "whole"
    assert sorted(p.name for p in copied.parent.iterdir()) == sorted([copied.name, live.name])  # the stale one gone

    model = tmp_path / "models" / "tiny"  # a model directory: the same temporary directories
    left = model.with_name(f".tiny.{'c' * 32}.tmp")
    (left / "sub").mkdir(parents=True)
    write_model_dir(model, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert sorted(p.name for p in model.parent.iterdir()) == ["tiny"]


def test_write_atomic_fsyncs_the_file_then_the_directory(tmp_path: Path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = tmp_path / "t.txt"
    write_atomic(target, lambda tmp: tmp.write_text("x"))
    assert len(synced) == 2
    assert re.fullmatch(rf"{re.escape(str(tmp_path))}/\.t\.txt\.[0-9a-f]{{32}}\.tmp", synced[0])
    assert synced[1] == str(tmp_path)
    assert target.read_text() == "x" and sorted(tmp_path.iterdir()) == [target]


# 8. Outputs a user names never replace the user's own files


def test_exports_and_generated_data_replace_only_their_own_kind_of_file(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    mine = {tmp_path / "mine.csv": "my,own\n1,2\n", tmp_path / "data" / "tasks.jsonl": '{"mine": 1}\n'}
    for path, text in mine.items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    show = ["leaderboard", "show", "--path", str(BAD_DIR / "leaderboard.parquet"), "--format", "csv", "--out"]
    refusal = "error: --out: {} exists and was not written by this command; remove it or choose another\n"
    assert run([*show, str(tmp_path / "mine.csv")]) == 1
    assert capsys.readouterr().err == refusal.format(tmp_path / "mine.csv")
    assert run(["data", "make", "--out", str(tmp_path / "data"), "--tasks", "20"]) == 1
    assert capsys.readouterr().err == refusal.format(tmp_path / "data" / "tasks.jsonl")
    assert {path: path.read_text() for path in mine} == mine
    # The command's own earlier output is replaced: an export of the same format, a sample of the same seed.
    for _ in range(2):
        assert run([*show, str(tmp_path / "board.csv")]) == 0
        assert run(["data", "make", "--out", str(tmp_path / "made"), "--tasks", str(20 + _)]) == 0
    assert (tmp_path / "board.csv").read_text().startswith("rank,agent,")
    assert len((tmp_path / "made" / "tasks.jsonl").read_text().splitlines()) == 21
    assert run(["data", "make", "--out", str(tmp_path / "made"), "--tasks", "20", "--seed", "1"]) == 0  # any sample
    capsys.readouterr()
    assert run([*show, str(tmp_path / "data")]) == 1
    assert capsys.readouterr().err == f"error: --out: {tmp_path / 'data'} is a directory\n"
    os.mkfifo(tmp_path / "fifo")  # never opened to check (that would wait for a writer)
    assert run([*show, str(tmp_path / "fifo")]) == 1
    assert capsys.readouterr().err == f"error: --out: {tmp_path / 'fifo'} is not a regular file\n"
    (tmp_path / "empty.csv").touch()  # nothing to lose
    assert run([*show, str(tmp_path / "empty.csv")]) == 0


def test_the_demo_refuses_data_under_artifacts_that_it_did_not_generate(tmp_path: Path, monkeypatch, capsys):
    from harness.cli.main import console

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HARNESS_MODELS_DIR", str(tmp_path / "art" / "models"))  # what the demo would set for good
    data = tmp_path / "art" / "data" / "tasks.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text('{"mine": 1}\n')
    assert run(["demo", "--artifacts", str(tmp_path / "art"), "--results", str(tmp_path / "res")]) == 1
    assert capsys.readouterr().err == (
        f"error: --artifacts: {data} is not a BehaviorBench-mini sample (`harness data make`), which the demo "
        "reuses; remove it or choose another --artifacts\n"
    )
    assert data.read_text() == '{"mine": 1}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    # The command's console is given back its own file (none: the current sys.stdout), not pytest's of the moment.
    assert console._file is None


def test_a_finished_sweep_is_reused_only_with_the_config_it_saved(tmp_path: Path):
    from harness.train.sweep import finished_best

    where = [f"runs_dir={tmp_path / 'runs'}", "name=s", f"train.data={tmp_path / 'd.jsonl'}"]
    started = config.load(SweepConfig, None, where)
    assert finished_best(started) is None
    best = started.files.best
    Path(best.path).parent.mkdir(parents=True)
    best.write_text('{"trial_id": "t1"}\n')
    with pytest.raises(
        ConfigError, match=rf"^sweep s: {best} has no {started.files.config} to check it against; remove"
    ):
        finished_best(started)
    started.files.config.write_text(yaml.safe_dump(config.to_dict(started)))
    assert finished_best(started) == {"trial_id": "t1"}
    with pytest.raises(ConfigError, match=r"was made with another config \(num_samples differ\)"):
        finished_best(config.load(SweepConfig, None, [*where, "num_samples=3"]))


def test_usage_errors_are_one_line_with_exit_2(tmp_path: Path, capsys):
    run_ = _harness(tmp_path, "data", "make", "--tasks", "0")
    _one_error_line(
        run_,
        "Invalid value for '--tasks': Input should be greater than or equal to 1 (see `harness data make --help`)",
        code=2,
    )
    assert run(["leaderboard", "show", "--bogus"]) == 2
    assert capsys.readouterr().err == (
        "error: No such option: --bogus (Possible options: --out) (see `harness leaderboard show --help`)\n"
    )
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cwd"]


def test_a_directory_copy_replaces_the_old_one_and_removes_what_a_killed_copy_left(tmp_path: Path):
    from harness.core.storage import location

    target = tmp_path / "run" / "final"
    (target / "old").mkdir(parents=True)
    left = target.with_name(f".final.{'d' * 32}.tmp")  # a killed copy's directory, its writer gone
    (left / "half").mkdir(parents=True)
    source = tmp_path / "model"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "weights.bin").write_bytes(b"new")
    location(str(target), "final").put_dir(source)
    assert sorted(p.name for p in target.parent.iterdir()) == ["final"]
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == ["sub", "sub/weights.bin"]
    assert (target / "sub" / "weights.bin").read_bytes() == b"new"


def test_an_evaluation_of_a_split_without_tasks_is_one_line(tmp_path: Path, monkeypatch, capsys, tiny_model, ray_local):
    data = write_sample(tmp_path / "data", tasks=20, seed=0)  # train and dev only
    agent = {"name": "a", "model": str(tiny_model), "mode": "zero_shot"}
    config_file = tmp_path / "eval.yaml"
    config_file.write_text(yaml.safe_dump({"agents": [agent], "data": str(data), "output_dir": str(tmp_path / "ev")}))
    monkeypatch.chdir(tmp_path)
    assert run(["eval", "--config", str(config_file), f"leaderboard={tmp_path / 'lb.parquet'}"]) == 1
    assert capsys.readouterr().err == f"error: {data}: no tasks in split 'test'\n"
    assert not (tmp_path / "lb.parquet").exists()
