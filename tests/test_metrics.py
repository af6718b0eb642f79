import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score

from harness.metrics import bootstrap, macro_f1, per_label, score


@pytest.mark.parametrize("seed", range(8))
def test_macro_f1_agrees_with_sklearn_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    labels = ["reactive", "proactive", "restraint", "other"][: rng.integers(2, 5)]
    gold = list(rng.choice(labels, size=rng.integers(5, 300)))
    pred = list(rng.choice(labels, size=len(gold)))
    assert macro_f1(gold, pred) == pytest.approx(f1_score(gold, pred, average="macro"))
    stats = per_label(gold, pred, labels)
    for label in labels:
        p = precision_score(gold, pred, labels=[label], average="macro", zero_division=0)
        r = recall_score(gold, pred, labels=[label], average="macro", zero_division=0)
        assert (stats[label]["precision"], stats[label]["recall"]) == pytest.approx((p, r))


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
    return pd.DataFrame(
        {
            "task_id": [f"t{i}" for i in range(n)],
            "category": [f"{t}-{i % 2}" for i, t in enumerate(types)],
            "task_type": types,
            "gold_behavior": gold,
            "pred_behavior": pred,
            "hard": rng.random(n) < 0.3,
        }
    )


def test_score_slices_and_confidence_intervals():
    frame = _predictions()
    table = score(frame, samples=500)
    overall = table[(table.subset == "all") & (table.slice == "overall") & (table.metric == "macro_f1")].iloc[0]
    assert overall.value == pytest.approx(f1_score(frame.gold_behavior, frame.pred_behavior, average="macro"))
    assert overall.ci_low < overall.value < overall.ci_high and 0 < overall.stderr < 0.05
    assert overall.n == 400
    hard = table[(table.subset == "hard") & (table.slice == "overall") & (table.metric == "macro_f1")].iloc[0]
    sub = frame[frame.hard]
    assert hard.value == pytest.approx(f1_score(sub.gold_behavior, sub.pred_behavior, average="macro"))
    slices = set(table[table.subset == "all"].slice)
    assert {"type:reactive", "type:proactive", "type:restraint", "category:proactive-0"} <= slices
    assert {"precision:proactive", "recall:reactive"} <= set(table.metric)
    np.testing.assert_array_equal(
        bootstrap(["a", "b"] * 5, ["a"] * 10, 50, seed=1)["macro_f1"],
        bootstrap(["a", "b"] * 5, ["a"] * 10, 50, seed=1)["macro_f1"],
    )


def test_score_cli_json_and_errors(tmp_path):
    path = tmp_path / "p.parquet"
    _predictions().to_parquet(path)
    run = subprocess.run(
        [sys.executable, "-m", "harness.cli", "score", str(path), "--json", "--bootstrap", "100"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    records = pd.read_json(__import__("io").StringIO(run.stdout))
    overall = records[(records.subset == "all") & (records.slice == "overall") & (records.metric == "macro_f1")]
    assert overall.value.iloc[0] == pytest.approx(score(_predictions(), samples=0).value.iloc[0])
    _predictions().drop(columns=["pred_behavior"]).to_parquet(path)
    bad = subprocess.run([sys.executable, "-m", "harness.cli", "score", str(path)], capture_output=True, text=True)
    assert bad.returncode == 1 and "pred_behavior" in bad.stderr and "Traceback" not in bad.stderr
