import io
import multiprocessing
from pathlib import Path

import numpy as np
import pandas as pd

from harness import leaderboard
from harness.metrics import score


def _rows(agent: str, run_id: str, accuracy: float, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = 200
    types = rng.choice(["reactive", "proactive", "restraint"], size=n)
    gold = np.where(types == "proactive", "proactive", "reactive")
    pred = np.where(rng.random(n) < accuracy, gold, np.where(gold == "proactive", "reactive", "proactive"))
    frame = pd.DataFrame(
        {
            "task_id": range(n),
            "category": types,
            "task_type": types,
            "gold_behavior": gold,
            "pred_behavior": pred,
            "hard": rng.random(n) < 0.3,
        }
    )
    return leaderboard.with_metadata(
        score(frame, samples=50),
        run_id=run_id,
        agent=agent,
        model="m",
        mode="zero_shot",
        design="",
        dataset="d",
        split="test",
    )


def test_append_replaces_a_rerun_instead_of_duplicating(tmp_path: Path):
    path = tmp_path / "lb.parquet"
    first = _rows("a", "r1", 0.9)
    leaderboard.append(path, first)
    leaderboard.append(path, first)
    leaderboard.append(path, _rows("b", "r2", 0.6))
    table = leaderboard.read(path)
    assert len(table) == 2 * len(first)
    assert list(table.columns) == leaderboard.COLUMNS
    assert table["value"].dtype == float and table["n"].dtype.kind == "i"
    ranking = leaderboard.ranking(table)
    assert list(ranking.agent) == ["a", "b"] and list(ranking["rank"]) == [1, 2]
    assert ranking.loc[0, "overall"] > ranking.loc[1, "overall"]
    assert not list(tmp_path.glob(".*.tmp"))


def _append_one(args):
    path, i = args
    leaderboard.append(Path(path), _rows(f"agent{i}", f"run{i}", 0.5 + i / 20, seed=i))


def test_concurrent_appends_keep_every_row(tmp_path: Path):
    path = tmp_path / "lb.parquet"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_append_one, [(str(path), i) for i in range(8)])
    table = leaderboard.read(path)
    assert sorted(table.run_id.unique()) == sorted(f"run{i}" for i in range(8))
    assert len(table) == 8 * len(_rows("x", "x", 0.5))


def test_exports(tmp_path: Path):
    table = leaderboard.ranking(pd.concat([_rows("a", "r1", 0.9), _rows("b<script>", "r2", 0.7)]))
    md = leaderboard.render(table, "md")
    assert md.splitlines()[0].startswith("| rank | agent |") and "| 1 | a |" in md
    csv = leaderboard.render(table, "csv")
    assert pd.read_csv(io.StringIO(csv)).shape[0] == 2
    page = leaderboard.render(table, "html")
    assert page.count("<rect") >= 6 and "<svg" in page and "b&lt;script&gt;" in page and "<script>" not in page
