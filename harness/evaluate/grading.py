"""Grading what the agents said on proactive tasks (`harness.results.content`): the exact check on tasks with
evidence, and the metrics rows and paired comparisons of each grader."""

from __future__ import annotations

from typing import Any

import pandas as pd

from harness.agents.selection import Strategy
from harness.results.content import content_rows, grade, paired_content
from harness.results.predictions import Prediction

# What grading keeps of each proactive task of the split (the judge reads the conversation and the reference).
PROACTIVE_COLUMNS = ("task_id", "case_id", "hard", "evidence", "reference", "messages")


def needs_answer(task_type: str, prediction: Prediction) -> bool:
    """Whether an answer must still be generated for grading: a proactive task where the agent intervened and said
    nothing yet, or only an option letter (a `choice` agent). One that did not intervene is graded `none`."""
    intervened = prediction.pred_behavior == "proactive"
    answered = bool(prediction.answer) and prediction.strategy != Strategy.CHOICE.value
    return task_type == "proactive" and intervened and not prediction.error and not answered


def exact_grades(predictions: pd.DataFrame, proactive: pd.DataFrame) -> pd.DataFrame:
    """The exact check's grade of each proactive task with evidence that the agent answered: task_id, case_id,
    hard, grade (empty when the agent gave no answers, as a `vllm` agent)."""
    with_evidence = proactive[proactive["evidence"].map(len) > 0]
    answered = predictions[predictions["answer"].notna()][["task_id", "pred_behavior", "answer"]]
    merged = answered.merge(with_evidence[["task_id", "case_id", "hard", "evidence"]], on="task_id")
    grades = [
        grade(answer, evidence, behavior == "proactive")
        for answer, evidence, behavior in zip(
            merged["answer"], merged["evidence"], merged["pred_behavior"], strict=True
        )
    ]
    return merged[["task_id", "case_id", "hard"]].assign(grade=grades)


def content_metrics(grades: dict[str, dict[str, pd.DataFrame]], samples: int, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Per agent: the content rows of every grader (`grader` column: `evidence` or `judge:NAME`) and, per grader,
    the paired comparisons of `caught` with the other agents graded on the same tasks."""
    rows: dict[str, list[pd.DataFrame]] = {}
    graders = sorted({grader for by_grader in grades.values() for grader in by_grader})
    for grader in graders:
        graded = {agent: by_grader[grader] for agent, by_grader in grades.items() if len(by_grader.get(grader, []))}
        paired = paired_content(graded, samples, seed)
        for agent, frame in graded.items():
            own = paired[paired["agent"] == agent].drop(columns="agent")
            rows.setdefault(agent, []).append(
                pd.concat([content_rows(frame, samples, seed), own]).assign(grader=grader)
            )
    return {agent: pd.concat(frames, ignore_index=True) for agent, frames in rows.items()}


def proactive_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(PROACTIVE_COLUMNS))
