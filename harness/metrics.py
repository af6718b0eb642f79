"""Metrics of behavior selection: Macro F1 (the headline), accuracy, per-behavior precision/recall,
with bootstrap 95% confidence intervals, overall, per task type and per category, full and hard."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

PREDICTION_COLUMNS = ("task_id", "category", "task_type", "gold_behavior", "pred_behavior")


def _f1_from_counts(counts: np.ndarray) -> np.ndarray:
    """Macro F1 from confusion matrices [..., gold, pred], over labels seen in gold or pred."""
    tp = np.diagonal(counts, axis1=-2, axis2=-1).astype(float)
    gold = counts.sum(-1).astype(float)
    pred = counts.sum(-2).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(gold + pred > 0, 2 * tp / (gold + pred), 0.0)
    seen = (gold + pred) > 0
    return np.where(seen.any(-1), (f1 * seen).sum(-1) / np.maximum(seen.sum(-1), 1), 0.0)


def _encode(gold: Sequence[str], pred: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    labels = sorted(set(gold) | set(pred))
    index = {label: i for i, label in enumerate(labels)}
    return (
        np.array([index[g] for g in gold], dtype=np.int64),
        np.array([index[p] for p in pred], dtype=np.int64),
        labels,
    )


def macro_f1(gold: Sequence[str], pred: Sequence[str]) -> float:
    """Unweighted mean F1 over every label seen in `gold` or `pred` (sklearn's average="macro")."""
    if len(gold) == 0:
        return 0.0
    g, p, labels = _encode(gold, pred)
    counts = np.bincount(g * len(labels) + p, minlength=len(labels) ** 2).reshape(len(labels), len(labels))
    return float(_f1_from_counts(counts))


def per_label(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of each label (0 where undefined, as sklearn does)."""
    out = {}
    gold_a, pred_a = np.asarray(gold, dtype=object), np.asarray(pred, dtype=object)
    for label in labels:
        tp = float(np.sum((gold_a == label) & (pred_a == label)))
        n_pred, n_gold = float(np.sum(pred_a == label)), float(np.sum(gold_a == label))
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_gold if n_gold else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[label] = {"precision": precision, "recall": recall, "f1": f1, "support": n_gold}
    return out


def bootstrap(gold: Sequence[str], pred: Sequence[str], samples: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """Macro F1 and accuracy of `samples` resamples (with replacement) of the tasks."""
    g, p, labels = _encode(gold, pred)
    n, k = len(g), len(labels)
    draws = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    cells = (np.arange(samples)[:, None] * k * k + g[draws] * k + p[draws]).ravel()
    counts = np.bincount(cells, minlength=samples * k * k).reshape(samples, k, k)
    return {"macro_f1": _f1_from_counts(counts), "accuracy": (g[draws] == p[draws]).mean(1)}


def _rows(frame: pd.DataFrame, subset: str, slice_name: str, samples: int, seed: int) -> list[dict]:
    gold, pred = list(frame["gold_behavior"]), list(frame["pred_behavior"])
    point = {"macro_f1": macro_f1(gold, pred), "accuracy": float(np.mean(np.array(gold) == np.array(pred)))}
    spread = bootstrap(gold, pred, samples, seed) if samples else {}
    rows = []
    for metric, value in point.items():
        draws = spread.get(metric)
        rows.append(
            {
                "subset": subset,
                "slice": slice_name,
                "metric": metric,
                "value": value,
                "n": len(gold),
                "stderr": float(draws.std(ddof=1)) if draws is not None and len(draws) > 1 else float("nan"),
                "ci_low": float(np.percentile(draws, 2.5)) if draws is not None else float("nan"),
                "ci_high": float(np.percentile(draws, 97.5)) if draws is not None else float("nan"),
            }
        )
    if slice_name == "overall":
        for label, stats in per_label(gold, pred, sorted(set(gold) | set(pred))).items():
            for metric in ("precision", "recall"):
                rows.append(
                    {
                        "subset": subset,
                        "slice": slice_name,
                        "metric": f"{metric}:{label}",
                        "value": stats[metric],
                        "n": len(gold),
                        "stderr": float("nan"),
                        "ci_low": float("nan"),
                        "ci_high": float("nan"),
                    }
                )
    return rows


def score(predictions: pd.DataFrame, samples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Tidy metrics: one row per subset (all, hard) x slice (overall, type:T, category:C) x metric."""
    missing = [c for c in PREDICTION_COLUMNS if c not in predictions.columns]
    if missing:
        raise ValueError(f"predictions lack column(s) {missing} (need {list(PREDICTION_COLUMNS)})")
    subsets = {"all": predictions}
    if "hard" in predictions.columns and predictions["hard"].astype(bool).any():
        subsets["hard"] = predictions[predictions["hard"].astype(bool)]
    rows: list[dict] = []
    for subset, frame in subsets.items():
        rows += _rows(frame, subset, "overall", samples, seed)
        for column, prefix in (("task_type", "type"), ("category", "category")):
            for value, group in frame.groupby(column, sort=True):
                rows += _rows(group, subset, f"{prefix}:{value}", samples, seed)
    return pd.DataFrame(rows)
