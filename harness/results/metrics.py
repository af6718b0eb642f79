"""Metrics of behavior selection, named for what they measure, with 95% bootstrap intervals by case.

`score` gives tidy rows, one per subset (all, hard) x slice x metric. A slice is two typed columns:
`slice_kind` (`overall`, `task_type`, `category`, or `versus` for paired comparisons) and `slice_value` (the task
type, the category or the other agent; "" for `overall`). `slice_name` spells one as `type:reactive` for display
and tracking; nothing parses that back.

- `overall` and every slice whose tasks have two or more gold behaviors: `macro_f1` (the headline;
  `sklearn.metrics.f1_score(average="macro")` over the labels seen in gold or predictions) and
  `accuracy` (share of tasks whose chosen behavior is the gold one);
- a slice whose tasks all share one gold behavior (a task type, a category): only the share of its tasks
  where the agent chose that behavior, `intervened_when_should` (gold proactive), `stayed_on_task` (gold
  reactive) or `accuracy` (any other gold label). Macro F1 of one gold label would be at most 0.5 after
  a single error;
- `overall` also: `over_intervention_rate` (share of gold-reactive tasks where proactive was chosen),
  `missed_intervention_rate` (share of gold-proactive tasks where reactive was chosen), and
  `precision:<label>`, `recall:<label>` (NaN where undefined).

`n` is the number of tasks a metric is computed over (for a rate, its denominator). Intervals resample
clinical cases, not tasks: with a `case_id` column, each of `samples` draws takes as many cases as the
slice has, with replacement, and every task of a drawn case comes along (tasks of one case are not
independent); without it, tasks are resampled. `ci_low`/`ci_high` are the 2.5/97.5 percentiles of the
draws, `stderr` their standard deviation. Each draw's confusion matrix is the product of the draws' case
multiplicities [draws, cases] and the per-case confusion counts [cases, k*k], in chunks of draws, so
time and memory grow with cases x draws and never with tasks x draws.

`paired` compares agents scored on the same tasks: the difference in overall Macro F1 with a paired
bootstrap interval (the same case draws for both agents) and the exact McNemar p-value (slice `versus`).
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow

from harness.core.errors import first_line
from harness.core.storage import Location
from harness.results.predictions import SCORED_COLUMNS

PROACTIVE, REACTIVE = "proactive", "reactive"
TEXT_COLUMNS = ("category", "task_type", "gold_behavior", "pred_behavior")
SHARE_METRICS = {PROACTIVE: "intervened_when_should", REACTIVE: "stayed_on_task"}
ROW_COLUMNS = ("subset", "slice_kind", "slice_value", "metric", "value", "n", "stderr", "ci_low", "ci_high")
OVERALL, VERSUS = "overall", "versus"
SLICE_PREFIXES = {"task_type": "type", "category": "category", VERSUS: "vs"}  # how `slice_name` spells a kind


def slice_name(kind: str, value: str) -> str:
    """A slice for people and tracking: `overall`, `type:reactive`, `category:consistency_check`, `vs:sft`."""
    return kind if kind == OVERALL else f"{SLICE_PREFIXES[kind]}:{value}"


CHUNK_ELEMENTS = 4_000_000  # draws x cases per chunk of case multiplicities: about 32 MB per array


def read_table(path: str | Path | Location) -> pd.DataFrame:
    """A Parquet file (local, or an object) as a frame; ValueError with one line when it is not readable Parquet."""
    try:
        return path.read_parquet() if isinstance(path, Location) else pd.read_parquet(path)
    except (OSError, ValueError, pyarrow.ArrowException) as exc:
        raise ValueError(f"not a readable Parquet file ({first_line(exc)})") from None


def check_predictions(predictions: pd.DataFrame, behaviors: Collection[str] | None = None) -> None:
    """Raise ValueError with one line unless every row can be scored (with `behaviors`: and names one of them)."""
    if predictions.empty:
        raise ValueError("no predictions")
    missing = [c for c in SCORED_COLUMNS if c not in predictions.columns]
    if missing:
        guess = "a leaderboard? " if {"metric", "value"} <= set(predictions.columns) else ""
        raise ValueError(f"not a predictions file ({guess}missing columns {', '.join(missing)})")
    ids = predictions["task_id"].reset_index(drop=True)
    for column in [*SCORED_COLUMNS, *(c for c in ("case_id", "hard") if c in predictions.columns)]:
        null = predictions[column].isna().to_numpy()
        if null.any():
            first = f"row {np.flatnonzero(null)[0]}" if column == "task_id" else ids[null].iloc[0]
            raise ValueError(f"{column} is null for {null.sum()} task(s), first {first}")
    for column in TEXT_COLUMNS:
        values = predictions[column].reset_index(drop=True)
        if isinstance(values.dtype, pd.StringDtype):
            continue
        bad = ~values.map(lambda v: isinstance(v, str)).to_numpy(dtype=bool)
        if bad.any():
            value = values[bad].iloc[0]
            raise ValueError(
                f"{column} is not a string for {bad.sum()} task(s), first {ids[bad].iloc[0]} "
                f"({type(value).__name__} {value!r})"
            )
    if "hard" in predictions.columns and not pd.api.types.is_bool_dtype(predictions["hard"]):
        raise ValueError(f"hard is {predictions['hard'].dtype}, not true/false (a text 'False' would count as hard)")
    duplicated = ids.duplicated().to_numpy()
    if duplicated.any():
        raise ValueError(f"task_id {ids[duplicated].iloc[0]} occurs more than once ({duplicated.sum()} repeat(s))")
    if behaviors is None:
        return
    for column in ("gold_behavior", "pred_behavior"):
        values = predictions[column].reset_index(drop=True)
        unknown = ~values.isin(list(behaviors)).to_numpy()
        if unknown.any():
            raise ValueError(
                f"{column} {values[unknown].iloc[0]!r} is not a behavior of the taxonomy {list(behaviors)} for "
                f"{unknown.sum()} task(s), first {ids[unknown].iloc[0]}"
            )


def _f1_from_counts(counts: np.ndarray) -> np.ndarray:
    """Macro F1 from confusion matrices [..., gold, pred], over labels seen in gold or pred."""
    tp = np.diagonal(counts, axis1=-2, axis2=-1).astype(float)
    gold = counts.sum(-1).astype(float)
    pred = counts.sum(-2).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(gold + pred > 0, 2 * tp / (gold + pred), 0.0)
    seen = (gold + pred) > 0
    return np.where(seen.any(-1), (f1 * seen).sum(-1) / np.maximum(seen.sum(-1), 1), 0.0)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    numerator, denominator = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    return np.divide(numerator, denominator, out=out, where=denominator > 0)


def _accuracy(counts: np.ndarray) -> np.ndarray:
    return _ratio(np.trace(counts, axis1=-2, axis2=-1), counts.sum((-2, -1)))


def _gold_share(counts: np.ndarray, gold: int, pred: int) -> np.ndarray:
    """Share of the tasks of gold label `gold` where `pred` was chosen (recall when gold == pred)."""
    return _ratio(counts[..., gold, pred], counts[..., gold, :].sum(-1))


def _precision(counts: np.ndarray, label: int) -> np.ndarray:
    return _ratio(counts[..., label, label], counts[..., :, label].sum(-1))


def _encode(*columns: Sequence[str]) -> tuple[list[str], list[np.ndarray]]:
    """Integer codes of each column over one sorted label set that always holds reactive and proactive."""
    values = np.concatenate([np.asarray(c, dtype=object) for c in columns] + [np.array([PROACTIVE, REACTIVE], object)])
    codes, labels = pd.factorize(values, sort=True)
    bounds = np.cumsum([len(c) for c in columns])
    return [str(label) for label in labels], np.split(codes.astype(np.int64), bounds)[: len(columns)]


def macro_f1(gold: Sequence[str], pred: Sequence[str]) -> float:
    """Unweighted mean F1 over every label seen in `gold` or `pred` (sklearn's average="macro")."""
    if len(gold) == 0:
        return 0.0
    labels, (g, p) = _encode(gold, pred)
    k = len(labels)
    return float(_f1_from_counts(np.bincount(g * k + p, minlength=k * k).reshape(k, k)))


def type_shares(types: Sequence[str], gold: Sequence[str], pred: Sequence[str], prefix: str = "") -> dict[str, float]:
    """Per task type, the share of its tasks where the predicted behavior is the gold one (the leaderboard's type
    columns), keyed `prefix + type`."""
    right = np.asarray(gold, dtype=object) == np.asarray(pred, dtype=object)
    kinds = np.asarray(types, dtype=object)
    return {f"{prefix}{kind}": float(right[kinds == kind].mean()) for kind in sorted(set(types))}


def _case_codes(predictions: pd.DataFrame) -> np.ndarray:
    if "case_id" in predictions.columns:
        return pd.factorize(predictions["case_id"])[0]
    return np.arange(len(predictions))


def case_bootstrap(cases: np.ndarray, cells: np.ndarray, k: int, samples: int, seed: int) -> np.ndarray:
    """Confusion matrices [samples, m, k, k] of `samples` resamples of the cases, with replacement.

    `cells` [tasks, m] holds gold * k + pred of each task for m predictors that share the draws;
    `cases` [tasks] names each task's case. Every task of a drawn case comes along.
    """
    case_index, case_names = pd.factorize(cases)
    n_cases, m = len(case_names), cells.shape[1]
    width = m * k * k
    per_case = (
        np.bincount((case_index[:, None] * width + np.arange(m) * k * k + cells).ravel(), minlength=n_cases * width)
        .reshape(n_cases, width)
        .astype(float)
    )
    rng = np.random.default_rng(seed)
    out = np.empty((samples, width))
    chunk = max(1, min(samples, CHUNK_ELEMENTS // n_cases))
    for start in range(0, samples, chunk):
        size = min(chunk, samples - start)
        picks = rng.integers(0, n_cases, size=(size, n_cases)) + (np.arange(size) * n_cases)[:, None]
        multiplicity = np.bincount(picks.ravel(), minlength=size * n_cases).reshape(size, n_cases)
        out[start : start + size] = multiplicity.astype(float) @ per_case
    return out.reshape(samples, m, k, k)


def metric_row(
    subset: str, where: tuple[str, str], metric: str, value: float, n: int, draws: np.ndarray | None
) -> dict:
    spread = np.empty(0) if draws is None else draws[~np.isnan(draws)]
    return {
        "subset": subset,
        "slice_kind": where[0],
        "slice_value": where[1],
        "metric": metric,
        "value": float(value),
        "n": int(n),
        "stderr": float(spread.std(ddof=1)) if len(spread) > 1 else float("nan"),
        "ci_low": float(np.percentile(spread, 2.5)) if len(spread) else float("nan"),
        "ci_high": float(np.percentile(spread, 97.5)) if len(spread) else float("nan"),
    }


def _slice_rows(
    subset: str, where: tuple[str, str], point: np.ndarray, draws: np.ndarray | None, labels: list[str]
) -> list[dict]:
    """The rows of one slice from its confusion matrix `point` [k, k] and its bootstrap `draws` [samples, k, k]."""
    index = {label: i for i, label in enumerate(labels)}
    gold_seen = [label for label in labels if point[index[label]].sum()]
    rows: list[dict] = []

    def add(metric: str, measure, n: int) -> None:
        rows.append(metric_row(subset, where, metric, measure(point), n, None if draws is None else measure(draws)))

    total = int(point.sum())
    overall = where[0] == OVERALL
    if overall or len(gold_seen) > 1:
        add("macro_f1", _f1_from_counts, total)
        add("accuracy", _accuracy, total)
    else:
        add(SHARE_METRICS.get(gold_seen[0], "accuracy"), _accuracy, total)
    if not overall:
        return rows
    for metric, gold, pred in (
        ("over_intervention_rate", REACTIVE, PROACTIVE),
        ("missed_intervention_rate", PROACTIVE, REACTIVE),
    ):
        if gold in gold_seen:
            add(metric, partial(_gold_share, gold=index[gold], pred=index[pred]), int(point[index[gold]].sum()))
    for label, i in index.items():
        if point[i].sum() or point[:, i].sum():
            add(f"precision:{label}", partial(_precision, label=i), int(point[:, i].sum()))
            add(f"recall:{label}", partial(_gold_share, gold=i, pred=i), int(point[i].sum()))
    return rows


def score(
    predictions: pd.DataFrame, samples: int = 1000, seed: int = 0, behaviors: Collection[str] | None = None
) -> pd.DataFrame:
    """Tidy metrics (see the module docstring) of one agent's predictions, with case-bootstrap 95% CIs.

    Raises ValueError with one line when `predictions` cannot be scored (`check_predictions`).
    """
    check_predictions(predictions, behaviors)
    labels, (gold, pred) = _encode(predictions["gold_behavior"], predictions["pred_behavior"])
    k = len(labels)
    cells = (gold * k + pred)[:, None]
    cases = _case_codes(predictions)
    subsets = {"all": np.ones(len(predictions), dtype=bool)}
    hard = predictions["hard"].to_numpy(dtype=bool) if "hard" in predictions.columns else None
    if hard is not None and hard.any():  # a boolean column: `check_predictions` refuses any other
        subsets["hard"] = hard
    rows: list[dict] = []
    for subset, in_subset in subsets.items():
        slices = [((OVERALL, ""), in_subset)]
        for column in ("task_type", "category"):
            values = predictions[column].to_numpy(dtype=object)
            slices += [((column, v), in_subset & (values == v)) for v in sorted(set(values[in_subset]))]
        for where, mask in slices:
            point = np.bincount(cells[mask, 0], minlength=k * k).reshape(k, k)
            draws = case_bootstrap(cases[mask], cells[mask], k, samples, seed)[:, 0] if samples else None
            rows += _slice_rows(subset, where, point, draws, labels)
    return pd.DataFrame(rows, columns=list(ROW_COLUMNS))


def paired(predictions: dict[str, pd.DataFrame], samples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Paired comparisons of every two agents scored on the same task ids (pairs whose task sets differ
    are skipped), as tidy rows with an `agent` column: for agent a, slice (`versus`, b), metric
    `macro_f1_diff` (overall Macro F1 of a minus b; CI from a paired bootstrap: the same case draws for
    both agents) and metric `mcnemar_p` (exact two-sided McNemar test on the tasks exactly one of them
    got right). Both directions are given. a beats b significantly when the 95% CI of `macro_f1_diff`
    excludes 0. Raises ValueError when an agent's predictions cannot be scored or two agents disagree
    on a task's gold behavior.
    """
    for name, frame in predictions.items():
        try:
            check_predictions(frame)
        except ValueError as exc:
            raise ValueError(f"agent {name}: {exc}") from None
    rows: list[dict] = []
    for a, b in itertools.combinations(sorted(predictions), 2):
        first, second = predictions[a].set_index("task_id"), predictions[b].set_index("task_id")
        if len(first) != len(second) or not first.index.isin(second.index).all():
            continue
        second = second.loc[first.index]
        differs = (first["gold_behavior"] != second["gold_behavior"]).to_numpy()
        if differs.any():
            raise ValueError(f"agents {a} and {b} disagree on gold_behavior, first task {first.index[differs][0]}")
        labels, (gold, pred_a, pred_b) = _encode(
            first["gold_behavior"], first["pred_behavior"], second["pred_behavior"]
        )
        k = len(labels)
        cells = np.stack([gold * k + pred_a, gold * k + pred_b], axis=1)
        point = np.stack([np.bincount(cells[:, j], minlength=k * k).reshape(k, k) for j in range(2)])
        diff = float(_f1_from_counts(point[0]) - _f1_from_counts(point[1]))
        draws = None
        if samples:
            counts = case_bootstrap(_case_codes(first.reset_index()), cells, k, samples, seed)
            draws = _f1_from_counts(counts[:, 0]) - _f1_from_counts(counts[:, 1])
        from scipy.stats import binomtest  # imported here, once there is a pair: scipy.stats takes 1.5 s to import

        only_a = int(((pred_a == gold) & (pred_b != gold)).sum())
        only_b = int(((pred_b == gold) & (pred_a != gold)).sum())
        p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
        n = len(first)
        for agent, other, sign in ((a, b, 1.0), (b, a, -1.0)):
            signed = None if draws is None else sign * draws
            rows.append({"agent": agent, **metric_row("all", (VERSUS, other), "macro_f1_diff", sign * diff, n, signed)})
            rows.append({"agent": agent, **metric_row("all", (VERSUS, other), "mcnemar_p", p, n, None)})
    return pd.DataFrame(rows, columns=["agent", *ROW_COLUMNS])


def score_agents(predictions: dict[str, pd.DataFrame], samples: int = 1000, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Each agent's `score` rows followed by its `paired` rows against the other agents (same columns)."""
    comparisons = paired(predictions, samples, seed)
    return {
        name: pd.concat(
            [score(frame, samples, seed), comparisons[comparisons["agent"] == name].drop(columns="agent")],
            ignore_index=True,
        )
        for name, frame in predictions.items()
    }
