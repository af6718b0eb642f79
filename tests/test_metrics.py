import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest
from sklearn.metrics import f1_score, precision_score, recall_score

from harness.results import metrics
from harness.results.metrics import case_bootstrap, macro_f1, paired, score

ROOT = Path(__file__).resolve().parents[1]


def _frame(gold, pred, task_type=None, category=None, case_id=None, hard=None) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "task_id": [f"t{i}" for i in range(len(gold))],
            "category": category if category is not None else task_type if task_type is not None else gold,
            "task_type": task_type if task_type is not None else gold,
            "gold_behavior": gold,
            "pred_behavior": pred,
        }
    )
    if case_id is not None:
        frame["case_id"] = case_id
    if hard is not None:
        frame["hard"] = hard
    return frame


def named(table: pd.DataFrame) -> pd.DataFrame:
    """`table` with each row's slice spelled as one name (`type:reactive`, `vs:b`), for readable lookups."""
    names = [metrics.slice_name(k, v) for k, v in zip(table.slice_kind, table.slice_value, strict=True)]
    return table.assign(slice=names)


def _value(table: pd.DataFrame, slice_name: str, metric: str, subset: str = "all") -> pd.Series:
    table = named(table)
    match = table[(table.subset == subset) & (table.slice == slice_name) & (table.metric == metric)]
    assert len(match) == 1, (subset, slice_name, metric)
    return match.iloc[0]


@pytest.mark.parametrize("seed", range(8))
def test_macro_f1_precision_recall_agree_with_sklearn_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    labels = ["reactive", "proactive", "restraint", "other"][: rng.integers(2, 5)]
    gold = list(rng.choice(labels, size=rng.integers(5, 300)))
    pred = list(rng.choice(labels, size=len(gold)))
    expected = f1_score(gold, pred, average="macro")
    assert macro_f1(gold, pred) == pytest.approx(expected)
    table = score(_frame(gold, pred, task_type=["t"] * len(gold)), samples=0)
    assert _value(table, "overall", "macro_f1").value == pytest.approx(expected)
    for label in sorted(set(gold) | set(pred)):
        p = precision_score(gold, pred, labels=[label], average="macro", zero_division=np.nan)
        r = recall_score(gold, pred, labels=[label], average="macro", zero_division=np.nan)
        got = (_value(table, "overall", f"precision:{label}").value, _value(table, "overall", f"recall:{label}").value)
        assert got == pytest.approx((p, r), nan_ok=True)


@pytest.mark.parametrize(
    "gold, pred",
    [
        (["proactive", "reactive", "reactive"], ["reactive", "reactive", "reactive"]),  # a class never predicted
        (["proactive"] * 5, ["proactive"] * 5),  # a single class, all right
        (["proactive"] * 5, ["reactive"] * 5),  # a single class, all wrong
        (["proactive"] * 4, ["proactive", "proactive", "reactive", "proactive"]),  # predicted-only class
        (["a", "b", "c"], ["c", "a", "b"]),
    ],
)
def test_macro_f1_edge_cases_match_sklearn(gold, pred):
    expected = f1_score(gold, pred, average="macro", zero_division=0)
    assert macro_f1(gold, pred) == pytest.approx(expected)


def _predictions(n=400, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    types = rng.choice(["reactive", "proactive", "restraint"], size=n)
    gold = np.where(types == "proactive", "proactive", "reactive")
    pred = np.where(rng.random(n) < 0.8, gold, np.where(gold == "proactive", "reactive", "proactive"))
    category = [f"{t}-{i % 2}" if i >= 40 else "mixed" for i, t in enumerate(types)]
    return _frame(gold, pred, task_type=types, category=category, case_id=np.arange(n) // 4, hard=rng.random(n) < 0.3)


def test_score_names_single_gold_slices_for_what_they_measure():
    frame = _predictions()
    table = score(frame, samples=200)
    overall = _value(table, "overall", "macro_f1")
    assert overall.value == pytest.approx(f1_score(frame.gold_behavior, frame.pred_behavior, average="macro"))
    assert overall.ci_low < overall.value < overall.ci_high and 0 < overall.stderr < 0.05 and overall.n == 400
    sub = frame[frame.hard]
    hard = _value(table, "overall", "macro_f1", subset="hard")
    assert hard.value == pytest.approx(f1_score(sub.gold_behavior, sub.pred_behavior, average="macro"))
    right = frame.gold_behavior == frame.pred_behavior
    for slice_name, metric, rows in [
        ("type:proactive", "intervened_when_should", frame.task_type == "proactive"),
        ("type:reactive", "stayed_on_task", frame.task_type == "reactive"),
        ("type:restraint", "stayed_on_task", frame.task_type == "restraint"),
        ("category:proactive-0", "intervened_when_should", frame.category == "proactive-0"),
    ]:
        row = _value(table, slice_name, metric)
        assert row.value == pytest.approx(right[rows].mean()) and row.n == rows.sum()
        assert row.ci_low <= row.value <= row.ci_high
        assert set(named(table)[(table.subset == "all") & (named(table).slice == slice_name)].metric) == {metric}
    mixed = table[(table.subset == "all") & (named(table).slice == "category:mixed")]
    assert set(mixed.metric) == {"macro_f1", "accuracy"}
    single = _frame(["a"] * 4, ["a", "a", "b", "a"], task_type=["x"] * 4)
    assert _value(score(single, samples=0), "type:x", "accuracy").value == 0.75


def test_over_and_missed_intervention_rates_match_a_hand_count():
    gold = ["reactive"] * 4 + ["proactive"] * 3
    pred = ["reactive", "proactive", "reactive", "proactive", "proactive", "reactive", "proactive"]
    table = score(_frame(gold, pred, hard=[True] * 7), samples=100)
    over, missed = (
        _value(table, "overall", "over_intervention_rate"),
        _value(table, "overall", "missed_intervention_rate"),
    )
    assert (over.value, over.n, missed.value, missed.n) == (pytest.approx(2 / 4), 4, pytest.approx(1 / 3), 3)
    assert over.ci_low <= 0.5 <= over.ci_high
    assert _value(table, "overall", "over_intervention_rate", subset="hard").value == pytest.approx(0.5)
    assert _value(table, "overall", "missed_intervention_rate", subset="hard").value == pytest.approx(1 / 3)


def test_type_shares_are_the_share_right_within_each_task_type():
    types = ["reactive", "restraint", "restraint", "restraint", "proactive", "proactive"]
    gold = ["reactive", "reactive", "reactive", "reactive", "proactive", "proactive"]
    pred = ["reactive", "proactive", "reactive", "reactive", "proactive", "reactive"]
    shares = metrics.type_shares(types, gold, pred, prefix="dev_")
    assert shares == {"dev_proactive": 0.5, "dev_reactive": 1.0, "dev_restraint": pytest.approx(2 / 3)}


def test_case_bootstrap_keeps_a_case_together_and_widens_the_interval():
    cases = np.repeat(np.arange(100), 10)  # 100 cases of 10 tasks: a case is all right or all wrong
    right = np.repeat(np.arange(100) % 2 == 0, 10)
    gold = np.array(["proactive"] * 1000)
    pred = np.where(right, "proactive", "reactive")
    counts = case_bootstrap(cases, ((right == 0).astype(np.int64))[:, None], 2, 200, 0)[:, 0]
    assert (counts.sum((1, 2)) == 1000).all() and (counts[:, 0, 0] % 10 == 0).all()
    by_case = _value(score(_frame(gold, pred, case_id=cases), samples=500), "type:proactive", "intervened_when_should")
    by_task = _value(score(_frame(gold, pred), samples=500), "type:proactive", "intervened_when_should")
    assert by_case.value == by_task.value == 0.5
    assert by_case.ci_high - by_case.ci_low > 2.5 * (by_task.ci_high - by_task.ci_low)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.iloc[:0], "no predictions"),
        (lambda f: f.drop(columns=["pred_behavior"]), "not a predictions file (missing columns pred_behavior)"),
        (lambda f: f.assign(pred_behavior=f.pred_behavior.where(~f.task_id.isin(["t17", "t30", "t99"]))),
         "pred_behavior is null for 3 task(s), first t17"),
        (lambda f: f.assign(gold_behavior=[1, *list(f.gold_behavior[1:])]),
         "gold_behavior is not a string for 1 task(s), first t0 (int 1)"),
        (lambda f: f.assign(task_id=["t0", *list(f.task_id[:-1])]), "task_id t0 occurs more than once (1 repeat(s))"),
        (lambda f: f.assign(hard=f.hard.astype(str)), "hard is str, not true/false (a text 'False' would count as "
         "hard)"),
    ],
)  # fmt: skip
def test_score_refuses_bad_predictions_with_one_line(change, message):
    with pytest.raises(ValueError) as error:
        score(change(_predictions(n=100)), samples=10)
    assert str(error.value) == message


def test_score_cli_json_reports_the_named_share(tmp_path):
    gold = ["proactive"] * 100 + ["reactive"] * 50
    pred = ["proactive"] * 90 + ["reactive"] * 10 + ["reactive"] * 50
    path = tmp_path / "p.parquet"
    _frame(gold, pred).to_parquet(path)
    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", "score", str(path), "--json", "--bootstrap", "100"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    records = pd.read_json(io.StringIO(done.stdout))
    assert _value(records, "type:proactive", "intervened_when_should").value == pytest.approx(0.9)
    assert _value(records, "overall", "macro_f1").value == pytest.approx(f1_score(gold, pred, average="macro"))


def _agents(n=400, seed=0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    types = rng.choice(["reactive", "proactive"], size=n)
    flip = {"proactive": "reactive", "reactive": "proactive"}
    strong = np.where(rng.random(n) < 0.95, types, [flip[t] for t in types])
    weak = np.where(rng.random(n) < 0.7, types, [flip[t] for t in types])
    make = lambda pred: _frame(types, pred, case_id=np.arange(n) // 4)  # noqa: E731
    return make(strong), make(strong.copy()), make(weak)


def test_paired_comparisons():
    strong, twin, weak = _agents()
    table = named(paired({"strong": strong, "twin": twin, "weak": weak}, samples=300))
    row = lambda agent, other, metric: table[  # noqa: E731
        (table.agent == agent) & (table.slice == f"vs:{other}") & (table.metric == metric)
    ].iloc[0]
    same = row("strong", "twin", "macro_f1_diff")
    assert (same.value, same.ci_low, same.ci_high, row("strong", "twin", "mcnemar_p").value) == (0, 0, 0, 1)
    better = row("strong", "weak", "macro_f1_diff")
    assert better.value == pytest.approx(
        macro_f1(strong.gold_behavior, strong.pred_behavior) - macro_f1(weak.gold_behavior, weak.pred_behavior)
    )
    assert better.ci_low > 0 and better.n == 400
    worse = row("weak", "strong", "macro_f1_diff")
    assert (worse.value, worse.ci_low, worse.ci_high) == pytest.approx((-better.value, -better.ci_high, -better.ci_low))
    right_strong = strong.pred_behavior == strong.gold_behavior
    right_weak = weak.pred_behavior == weak.gold_behavior
    only_strong, only_weak = int((right_strong & ~right_weak).sum()), int((right_weak & ~right_strong).sum())
    p = binomtest(only_strong, only_strong + only_weak, 0.5).pvalue
    assert row("strong", "weak", "mcnemar_p").value == pytest.approx(p) == row("weak", "strong", "mcnemar_p").value
    assert p < 0.05
    assert len(table) == 3 * 2 * 2  # three pairs, both directions, two metrics
    assert paired({"strong": strong, "fewer": weak.iloc[:-1]}, samples=10).empty
    with pytest.raises(ValueError, match="agents strong and wrong disagree on gold_behavior, first task t0"):
        paired({"strong": strong, "wrong": weak.assign(gold_behavior=["x", *list(weak.gold_behavior[1:])])})
