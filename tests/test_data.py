import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness.core.errors import DataError
from harness.data.io import fingerprint, load_dataset, load_tasks, put_split, validate
from harness.data.mini import generate, write_sample

from .conftest import BAD_DIR


def _expected(path: Path) -> list[tuple[int, str]]:
    rows = []
    for line in path.read_text().splitlines():
        number, rest = line.split(": ", 1)
        rows.append((int(number), rest))
    return rows


def test_validate_reports_every_problem_of_a_bad_file_line_by_line():
    bad = BAD_DIR / "mixed.jsonl"
    result = validate(bad)
    expected = _expected(BAD_DIR / "mixed.expected")
    assert len(result.problems) == len(expected)
    for problem, (line, text) in zip(result.problems, expected, strict=True):
        assert problem.startswith(f"{bad}:{line}: "), problem
        assert text in problem, (problem, text)
    assert result.good_rows == 2  # ok-1 and ok-13
    assert result.rejected_lines == 11


def test_cli_validate_exit_codes_and_output(sample: Path):
    bad = BAD_DIR / "mixed.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "harness.cli", "data", "validate", str(bad)], capture_output=True, text=True
    )
    assert run.returncode == 1
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 15 and all(line.startswith(f"{bad}:") for line in lines)
    assert run.stderr == f"{bad}: 15 problem(s) in 11 row(s); 2 row(s) valid\n"
    good = subprocess.run(
        [sys.executable, "-m", "harness.cli", "data", "validate", str(sample)], capture_output=True, text=True
    )
    assert good.returncode == 0, good.stderr
    assert "400 valid tasks" in good.stdout and "risk_identification" in good.stdout


def test_loading_refuses_a_bad_file_unless_asked_to_skip(tmp_path: Path):
    bad = BAD_DIR / "mixed.jsonl"
    with pytest.raises(DataError) as info:
        load_tasks(bad)
    assert len(info.value.problems) == 15
    rejects = tmp_path / "rejects.jsonl"
    frame = load_tasks(bad, skip_bad_rows=True, rejects_path=rejects)
    assert list(frame["task_id"]) == ["ok-1", "ok-13"]
    assert frame.attrs["rejected_rows"] == 11
    rejected = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert len(rejected) == 11
    assert rejected[0]["source"] == f"{bad}:2"
    assert rejected[0]["row"] == (bad.read_text().splitlines()[1])  # malformed JSON: the line itself, not lost
    assert rejected[5]["row"]["task_id"] == "ok-1"  # the duplicate, kept whole


def test_missing_path_and_wrong_suffix_are_clear(tmp_path: Path):
    with pytest.raises(DataError, match="no such file"):
        validate(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        validate(tmp_path / "x.csv")


def test_parquet_and_directories_load_like_jsonl(sample: Path, tmp_path: Path):
    frame = load_tasks(sample)
    frame.iloc[:150].to_parquet(tmp_path / "a.parquet")
    frame.iloc[150:].to_json(tmp_path / "b.jsonl", orient="records", lines=True)
    both = load_tasks(tmp_path)
    pd.testing.assert_frame_equal(both, frame)
    assert list(load_tasks(sample, split="dev")["split"].unique()) == ["dev"]


def test_parquet_problems_name_the_row(tmp_path: Path):
    rows = [r.to_row() for r in generate(5, seed=1)]
    rows[3]["category"] = "unknown_thing"
    pd.DataFrame(rows).to_parquet(tmp_path / "t.parquet")
    result = validate(tmp_path / "t.parquet")
    assert result.problems == [
        f"{tmp_path / 't.parquet'}:4: category: unknown category 'unknown_thing' "
        f"(taxonomy {result.problems[0].split('(taxonomy ')[1][:-1]})"
    ]


def test_ray_dataset_streams_the_same_tasks(sample: Path, tmp_path: Path, ray_local):
    ds = load_dataset(sample)
    rows = sorted(ds.take_all(), key=lambda r: r["task_id"])
    frame = load_tasks(sample)
    assert [r["task_id"] for r in rows] == sorted(frame["task_id"])
    assert rows[0]["messages"] == frame.sort_values("task_id").iloc[0]["messages"]
    with pytest.raises(DataError):
        load_dataset(BAD_DIR / "mixed.jsonl")
    skipped = load_dataset(BAD_DIR / "mixed.jsonl", skip_bad_rows=True, rejects_path=tmp_path / "r.jsonl")
    assert sorted(r["task_id"] for r in skipped.take_all()) == ["ok-1", "ok-13"]


def test_a_split_is_put_in_blocks_as_it_is_validated(sample: Path, tmp_path: Path, ray_local):
    blocks, ids = put_split(sample, "test", 16)
    test = load_tasks(sample, split="test")
    assert ids == list(test.task_id)  # file order
    tables = ray_local.get(blocks)
    assert [t.num_rows for t in tables] == [16] * (len(ids) // 16) + ([len(ids) % 16] if len(ids) % 16 else [])
    assert tables[0].to_pylist()[0] == test.iloc[0].to_dict() | {"messages": list(test.iloc[0].messages)}
    with pytest.raises(DataError):
        put_split(BAD_DIR / "mixed.jsonl", "test", 16)
    rejects = tmp_path / "rejects.jsonl"
    blocks, ids = put_split(BAD_DIR / "mixed.jsonl", "test", 16, skip_bad_rows=True, rejects_path=rejects)
    assert ids == ["ok-1"] and [t.num_rows for t in ray_local.get(blocks)] == [1]  # ok-13 is a dev task
    assert len(rejects.read_text().splitlines()) == 11


def test_sample_is_deterministic_and_covers_the_taxonomy(tmp_path: Path):
    a = write_sample(tmp_path / "a", tasks=3000, seed=3).read_bytes()
    b = write_sample(tmp_path / "b", tasks=3000, seed=3).read_bytes()
    assert a == b
    assert write_sample(tmp_path / "c", tasks=3000, seed=4).read_bytes() != a
    frame = load_tasks(tmp_path / "a" / "tasks.jsonl")
    assert len(frame) == 3000
    assert frame.groupby("split")["category"].nunique().to_dict() == {"dev": 13, "test": 13, "train": 13}
    assert 0.15 < frame["hard"].mean() < 0.35
    assert set(frame.groupby("hard")["split"].nunique()) == {3}
    # Cases never straddle splits, so no case leaks from train into test.
    assert frame.groupby("case_id")["split"].nunique().max() == 1
    hard = frame[frame["hard"]]["messages"].map(len).mean()
    assert hard > frame[~frame["hard"]]["messages"].map(len).mean() + 1.5
    assert fingerprint(tmp_path / "a" / "tasks.jsonl") != fingerprint(tmp_path / "c" / "tasks.jsonl")


def test_labels_are_not_keyed_on_the_request(tmp_path: Path):
    """Proactive tasks and their restraint twins share their requests: the label is in the case facts."""
    frame = load_tasks(write_sample(tmp_path, tasks=3000, seed=0))
    request = frame["messages"].map(lambda m: m[-1]["content"].split(": ", 1)[1].split(" ")[0])
    mixed = frame.assign(first_word=request).groupby("first_word")["gold_behavior"].nunique()
    share = frame.assign(first_word=request)[lambda f: f["first_word"].isin(mixed[mixed > 1].index)]
    assert share["task_type"].isin(["proactive", "restraint"]).mean() > 0.5
    assert len(share) > 0.3 * len(frame)


def test_bad_evidence_is_named_by_line_and_field(tmp_path: Path):
    proactive = next(task for task in generate(40, seed=1) if task.task_type == "proactive").to_row()
    rows = [
        proactive,
        {**proactive, "task_id": "t2", "evidence": "amlodipine"},
        {**proactive, "task_id": "t3", "evidence": [["amlodipine"], []]},
        {**proactive, "task_id": "t4", "evidence": [["amlodipine", " "]]},
    ]
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    problems = validate(path).problems
    assert len(problems) == 3
    assert problems[0].startswith(f"{path}:2: evidence: expected list"), problems[0]
    assert problems[1].startswith(f"{path}:3: evidence[1]: expected a non-empty list"), problems[1]
    assert problems[2].startswith(f"{path}:4: evidence[0]: every spelling must be non-empty"), problems[2]


def test_every_mini_proactive_task_has_evidence_its_reference_meets():
    from harness.results.content import grade

    tasks = generate(600, seed=3)
    proactive = [task for task in tasks if task.task_type == "proactive"]
    assert proactive and all(task.evidence for task in proactive)
    assert all(grade(task.reference, task.evidence, True) == "caught" for task in proactive)
    assert not any(task.evidence for task in tasks if task.task_type != "proactive")
