"""Did the intervention name the problem? Content grades of proactive answers, and their metrics.

Macro F1 counts a proactive task as right whenever the agent intervenes. A content grade says what the
intervention said, one of:

- `caught`: the agent intervened and its answer names the problem: it meets every requirement of the task's
  `evidence` (each requirement met by any of its spellings, case-insensitively);
- `wrong`: it intervened and names part of the problem but not all of it (some requirements met, not all);
- `vague`: it intervened and names none of it ("please double-check");
- `none`: it did not intervene.

`grade` is the exact check on tasks with evidence; a judge model grades tasks by their reference answer instead
(`harness.evaluate.judge`), with the same four grades. Over a subset's proactive tasks that were graded, `caught`
is the share graded caught and `vague_or_wrong` the share of interventions that named something else (vague or
wrong), each with a 95% interval resampling cases, as for Macro F1 (`harness.results.metrics`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pandas as pd

from harness.results.metrics import ROW_COLUMNS, VERSUS, case_bootstrap, metric_row

NONE = "none"  # the grade of an answer that did not intervene
GRADES = ("caught", "wrong", "vague", NONE)
EVIDENCE = "evidence"  # the grader named in leaderboard rows when the exact check graded
CONTENT_METRICS = ("caught", "vague_or_wrong")


def grade(answer: str, evidence: Sequence[Sequence[str]], intervened: bool) -> str:
    """The exact check: `caught`, `wrong`, `vague` or `none` (see the module docstring)."""
    if not intervened:
        return NONE
    text = (answer or "").lower()
    met = [any(spelling.lower() in text for spelling in requirement) for requirement in evidence]
    if met and all(met):
        return "caught"
    return "wrong" if any(met) else "vague"


def content_rows(graded: pd.DataFrame, samples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Leaderboard metric rows of one agent's grades (task_id, case_id, hard, grade): `caught` and
    `vague_or_wrong` over all proactive tasks and the hard ones, slice (task_type, proactive)."""
    rows = []
    subsets = {"all": np.ones(len(graded), dtype=bool), "hard": graded["hard"].to_numpy(dtype=bool)}
    cases = pd.factorize(graded["case_id"])[0]
    for subset, mask in subsets.items():
        if not mask.any():
            continue
        grades = graded["grade"].to_numpy()[mask]
        caught = (grades == "caught").astype(np.int64)
        intervened = grades != NONE
        named_else = ((grades == "wrong") | (grades == "vague")).astype(np.int64)
        for metric, hits, among in (
            ("caught", caught, np.ones(len(grades), dtype=bool)),
            ("vague_or_wrong", named_else, intervened),
        ):
            value, draws = _share(hits[among], cases[mask][among], samples, seed)
            rows.append(metric_row(subset, ("task_type", "proactive"), metric, value, int(among.sum()), draws))
    return pd.DataFrame(rows, columns=list(ROW_COLUMNS))


def _share(hits: np.ndarray, cases: np.ndarray, samples: int, seed: int) -> tuple[float, np.ndarray | None]:
    """The share of `hits` (0/1 per task) and its case-bootstrap draws (a 2x2 table: gold 0, predicted = hit)."""
    if not len(hits):
        return float("nan"), None
    if not samples:
        return float(hits.mean()), None
    counts = case_bootstrap(cases, hits[:, None], 2, samples, seed)[:, 0, 0]  # [samples, 2]: misses, hits
    with np.errstate(invalid="ignore"):
        return float(hits.mean()), counts[:, 1] / counts.sum(1)


def paired_content(graded: dict[str, pd.DataFrame], samples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """For every two agents graded on the same tasks: the difference in `caught` (a minus b) with a paired
    bootstrap interval (the same case draws for both) and the exact McNemar p-value, slice (versus, b), metrics
    `caught_diff` and `caught_mcnemar_p`; both directions, with an `agent` column."""
    from scipy.stats import binomtest

    rows = []
    for a, b in itertools.combinations(sorted(graded), 2):
        first, second = graded[a].set_index("task_id"), graded[b].set_index("task_id")
        if len(first) != len(second) or not first.index.isin(second.index).all():
            continue
        second = second.loc[first.index]
        hit_a = (first["grade"] == "caught").to_numpy(dtype=np.int64)
        hit_b = (second["grade"] == "caught").to_numpy(dtype=np.int64)
        diff = float(hit_a.mean() - hit_b.mean())
        draws = None
        if samples:
            cells = np.stack([hit_a, hit_b], axis=1)
            counts = case_bootstrap(pd.factorize(first["case_id"])[0], cells, 2, samples, seed)[:, :, 0]
            with np.errstate(invalid="ignore"):
                shares = counts[:, :, 1] / counts.sum(2)
            draws = shares[:, 0] - shares[:, 1]
        only_a, only_b = int(((hit_a == 1) & (hit_b == 0)).sum()), int(((hit_b == 1) & (hit_a == 0)).sum())
        p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
        for agent, other, sign in ((a, b, 1.0), (b, a, -1.0)):
            signed = None if draws is None else sign * draws
            rows.append(
                {"agent": agent, **metric_row("all", (VERSUS, other), "caught_diff", sign * diff, len(first), signed)}
            )
            rows.append({"agent": agent, **metric_row("all", (VERSUS, other), "caught_mcnemar_p", p, len(first), None)})
    return pd.DataFrame(rows, columns=["agent", *ROW_COLUMNS])
