import io
import multiprocessing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.core.errors import ConfigError
from harness.results import leaderboard
from harness.results.metrics import score, score_agents
from tests.test_metrics import named


def _predictions(accuracy: float, seed: int = 0, n: int = 200) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    types = np.random.default_rng(0).choice(["reactive", "proactive", "restraint"], size=n)
    gold = np.where(types == "proactive", "proactive", "reactive")
    pred = np.where(rng.random(n) < accuracy, gold, np.where(gold == "proactive", "reactive", "proactive"))
    return pd.DataFrame(
        {
            "task_id": range(n),
            "case_id": np.arange(n) // 2,
            "category": types,
            "task_type": types,
            "gold_behavior": gold,
            "pred_behavior": pred,
            "hard": np.arange(n) % 3 == 0,
        }
    )


def _metadata(rows: pd.DataFrame, agent: str, run_id: str, dataset: str = "d") -> pd.DataFrame:
    return leaderboard.with_metadata(
        rows,
        run_id=run_id,
        agent=agent,
        model="m",
        mode="zero_shot",
        design="",
        readout="logprobs",
        dataset=dataset,
        split="test",
    )


def _rows(agent: str, run_id: str, accuracy: float, seed: int = 0, dataset: str = "d") -> pd.DataFrame:
    return _metadata(score(_predictions(accuracy, seed), samples=50), agent, run_id, dataset)


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
    assert list(ranking.columns) == leaderboard.TABLE_COLUMNS
    assert ranking.loc[0, "overall"] > ranking.loc[1, "overall"]
    a = named(table[(table.agent == "a") & (table.subset == "all")]).set_index(["slice", "metric"]).value
    assert ranking.loc[0, "proactive"] == a["type:proactive", "intervened_when_should"]
    assert ranking.loc[0, "restraint"] == a["type:restraint", "stayed_on_task"]
    assert ranking.loc[0, "over_intervention"] == a["overall", "over_intervention_rate"]
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


def test_an_undefined_metric_is_a_blank_cell_not_nan():
    table = leaderboard.ranking(_rows("a", "r1", 0.9)).assign(vague_or_wrong=float("nan"))
    header, _, row = leaderboard.render(table, "md").splitlines()
    assert dict(zip(header.split(" | "), row.split(" | "), strict=True))["vague_or_wrong"] == ""
    assert ">NaN<" not in leaderboard.render(table, "html") and ">nan<" not in leaderboard.render(table, "html")


def test_html_explains_columns_and_charts_the_shares():
    page = leaderboard.render(leaderboard.ranking(_rows("a", "r1", 0.9)), "html")
    assert "share of tasks with the right behavior</text>" in page and "dataset d, split test" in page
    for label in leaderboard.CHART_SERIES.values():
        assert f"{label}</text>" in page
    for column in leaderboard.TABLE_COLUMNS:
        assert f"<li><b>{column}</b>: " in page


def test_ranking_compares_one_dataset_and_split(tmp_path: Path):
    old = _rows("a", "r1", 0.9, dataset="old")
    new = pd.concat([_rows("b", "r2", 0.7, dataset="new"), _rows("c", "r3", 0.6, dataset="new")])
    new["timestamp"] = "9999-01-01T00:00:00+00:00"
    table = leaderboard.ranking(pd.concat([old, new]))
    assert list(table.agent) == ["b", "c"] and table.attrs == {"dataset": "new", "split": "test"}
    assert list(leaderboard.ranking(pd.concat([old, new]), dataset="old").agent) == ["a"]
    with pytest.raises(ValueError, match="no runs on dataset none, split any"):
        leaderboard.ranking(new, dataset="none")


def test_ranking_ties_agents_not_significantly_apart():
    predictions = {
        "best": _predictions(0.9, seed=1),
        "close": _predictions(0.9, seed=2),
        "worst": _predictions(0.55, seed=3),
    }
    scored = score_agents(predictions, samples=200)
    frame = pd.concat([_metadata(rows, agent, f"run-{agent}") for agent, rows in scored.items()])
    best = named(scored["best"]).set_index(["slice", "metric"])
    close = best.loc[("vs:close", "macro_f1_diff")]
    assert close.ci_low < 0 < close.ci_high and best.loc[("vs:worst", "macro_f1_diff")].ci_low > 0
    ranking = leaderboard.ranking(frame)
    assert list(ranking.agent) == ["best", "close", "worst"] or list(ranking.agent) == ["close", "best", "worst"]
    assert list(ranking["rank"]) == [1, 1, 3]
    plain = leaderboard.ranking(frame[frame.slice_kind != "versus"])
    assert list(plain["rank"]) == [1, 2, 3]
    assert "| 1 | best |" in leaderboard.render(ranking, "md") and "| 1 | close |" in leaderboard.render(ranking, "md")


def test_read_refuses_what_is_not_a_leaderboard_and_a_missing_one_is_empty(tmp_path: Path):
    predictions = tmp_path / "predictions.parquet"
    _predictions(0.9).to_parquet(predictions)
    with pytest.raises(ConfigError) as error:
        leaderboard.read(predictions)
    missing = "run_id, agent, model, mode, design, dataset, split, subset, slice_kind, slice_value, metric, value, "
    assert str(error.value) == (
        f"{predictions}: not a leaderboard (a predictions file? missing columns {missing}stderr, ci_low, ci_high, n, "
        "code_version, timestamp)"
    )
    assert leaderboard.read(tmp_path / "missing.parquet").empty


def test_agents_scored_without_bootstrap_rank_without_intervals(tmp_path: Path):
    scored = score_agents({"a": _predictions(0.9, seed=1), "b": _predictions(0.6, seed=2)}, samples=0)
    frame = pd.concat([_metadata(rows, agent, f"run-{agent}") for agent, rows in scored.items()])
    assert frame.ci_low.isna().all()
    board = tmp_path / "lb.parquet"
    leaderboard.append(board, frame.astype({"ci_low": object, "ci_high": object}).replace({np.nan: None}))
    ranking = leaderboard.ranking(leaderboard.read(board))
    assert list(ranking.agent) == ["a", "b"] and list(ranking["rank"]) == [1, 2]  # no interval: no tie either
    assert list(ranking.overall_ci) == ["", ""]
    assert "| 1 | a |" in leaderboard.render(ranking, "md")
