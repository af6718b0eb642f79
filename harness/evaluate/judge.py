"""A judge: a model that grades what agents said on proactive tasks against each task's reference answer, for
data without evidence (`harness.results.content`). The eval config names it (`judge:`, an agent spec: a local
`hf` model or an `endpoint` agent); `rubric.yaml` beside this module is what it is told.

It grades the interventions only (an answer that did not intervene is `none` without asking), with the same four
grades as the exact check. A local judge scores the four grade words by log-likelihood, as a `choice` agent
scores its letters; an endpoint judge is read from its text (its first grade word). Each agent's grades are kept
beside its predictions with the judge's name (`judge:NAME`); on data with evidence, the judge's agreement with the
exact check (Cohen's kappa and a confusion table) goes beside them (`judge-NAME.agreement.json`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from harness.results.content import GRADES

RUBRIC = Path(__file__).with_name("rubric.yaml")
WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Rubric:
    system: str
    grades: dict[str, str]
    question: str

    def messages(self, conversation: list[dict[str, Any]], reference: str, answer: str) -> list[dict[str, str]]:
        """What the judge reads: the rubric, then the conversation, the reference answer and the answer to grade."""
        described = "\n".join(f"- {grade}: {text}" for grade, text in self.grades.items())
        turns = "\n".join(f"{m['role']}: {m['content']}" for m in conversation if m["role"] != "system")
        return [
            {"role": "system", "content": f"{self.system}\n\nGrades:\n{described}"},
            {
                "role": "user",
                "content": f"Conversation:\n{turns}\n\nReference answer: {reference}\n\nAssistant's answer: {answer}"
                f"\n\n{self.question}",
            },
        ]


def load_rubric(path: Path = RUBRIC) -> Rubric:
    values = yaml.safe_load(path.read_text())
    return Rubric(values["system"], dict(values["grades"]), values["question"])


def read_grade(text: str) -> str | None:
    """The grade a judge's text gives: its first grade word, else None."""
    return next((word for word in WORD.findall(text.lower()) if word in GRADES), None)


class LocalJudge:
    """Ray Data callable class: a local model that grades each row (task_id, agent, messages, reference, answer)
    by the log-likelihood of each grade word after the rubric's question."""

    def __init__(self, path: str, dtype: str, trust_remote_code: bool, max_prompt_tokens: int, batch_size: int):
        from harness.agents.loading import load_model, load_tokenizer
        from harness.agents.references import local_copy

        local = local_copy(path)
        self.tokenizer = load_tokenizer(local, trust_remote_code)
        self.model = load_model(local, dtype, trust_remote_code).eval()
        self.rubric, self.limit, self.batch_size = load_rubric(), max_prompt_tokens, batch_size
        self.labels = [self.tokenizer(grade, add_special_tokens=False)["input_ids"] for grade in GRADES]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from harness.agents.encoding import encode_prompt
        from harness.agents.prompts import prompt_text
        from harness.agents.scoring import label_scores

        prompts = [
            encode_prompt(self.tokenizer, prompt_text(self.tokenizer, self.rubric.messages(list(m), r, a)), self.limit)
            for m, r, a in zip(batch["messages"], batch["reference"], batch["answer"], strict=True)
        ]
        grades: list[str] = [""] * len(prompts)
        for start in range(0, len(prompts), self.batch_size):
            scores = label_scores(
                self.model, prompts[start : start + self.batch_size], self.labels, self.tokenizer.pad_token_id
            )
            for k, j in enumerate(scores.argmax(1).tolist()):
                grades[start + k] = GRADES[j]
        return {
            "agent": list(batch["agent"]),
            "task_id": list(batch["task_id"]),
            "grade": grades,
            "error": [""] * len(grades),
        }


def agreement(exact: pd.Series, judged: pd.Series) -> dict[str, Any]:
    """Cohen's kappa of two graders on the same tasks (as sklearn's `cohen_kappa_score` computes it) and their
    confusion table (exact grade -> judge grade -> tasks)."""
    labels = list(GRADES)
    table = pd.crosstab(exact, judged).reindex(index=labels, columns=labels, fill_value=0)
    counts = table.to_numpy(dtype=float)
    total = counts.sum()
    if not total:
        return {"kappa": float("nan"), "n": 0, "confusion": {}}
    observed = np.trace(counts) / total
    expected = (counts.sum(1) * counts.sum(0)).sum() / total**2
    kappa = float((observed - expected) / (1 - expected)) if expected < 1 else float("nan")  # sklearn's 0/0
    confusion = {e: {j: int(table.loc[e, j]) for j in labels if table.loc[e, j]} for e in labels if table.loc[e].sum()}
    return {"kappa": kappa, "n": int(total), "confusion": confusion}


def write_agreement(location: Any, judge: str, result: dict[str, Any]) -> None:
    location.write_text(json.dumps({"judge": judge, **result}, indent=2) + "\n")


class EndpointJudge:
    """Ray Data callable class: an endpoint model that grades each row from its text (its first grade word)."""

    def __init__(self, settings: Any, model: str, ledger: Any, responses: Any):
        from harness.evaluate.endpoint import EndpointClient

        self.client, self.model, self.rubric = EndpointClient(settings, ledger, responses), model, load_rubric()
        self.settings = settings

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = zip(batch["messages"], batch["reference"], batch["answer"], strict=True)
        results = self.client.run(self._grade_all([self.rubric.messages(list(m), r, a) for m, r, a in rows]))
        return {
            "agent": list(batch["agent"]),
            "task_id": list(batch["task_id"]),
            "grade": [grade for grade, _ in results],
            "error": [error for _, error in results],
        }

    async def _grade_all(self, conversations: list[list[dict[str, str]]]) -> list[tuple[str, str]]:
        import asyncio

        from harness.evaluate.endpoint import EndpointError, completion_text

        gate = asyncio.Semaphore(self.settings.concurrency)

        async def one(messages: list[dict[str, str]]) -> tuple[str, str]:
            body = {"model": self.model, "messages": messages, "max_tokens": 4, "temperature": 0.0}
            async with gate:
                if self.client.stopped:
                    return "", self.client.stopped
                try:
                    completion = await self.client.complete(
                        {**body, "seed": self.settings.seed, **self.settings.extra_body}
                    )
                except EndpointError as exc:
                    return "", self.client.failed(exc)
            return read_grade(completion_text(completion)) or "", ""

        return list(await asyncio.gather(*(one(m) for m in conversations)))
