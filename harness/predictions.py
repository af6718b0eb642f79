"""The prediction store: one owner of an agent run's predictions on disk.

Parts land as they arrive (`<root>/<key>/part-*.parquet`, each written atomically: a renamed local file or
one whole object), so a killed job keeps its progress; `finalize` checks that the parts hold exactly the
planned tasks and writes `<root>/<key>.parquet`. The root is a local directory or an object-store prefix
(`harness.store.Location`).
"""

from __future__ import annotations

import uuid

import pandas as pd

from harness.errors import HarnessError
from harness.store import Location

PREDICTION_SCHEMA = {
    "task_id": "string",
    "case_id": "string",
    "agent": "string",
    "category": "string",
    "task_type": "string",
    "gold_behavior": "string",
    "hard": "bool",
    "strategy": "string",
    "prompt": "string",  # the rendered prompt (chat template applied), before truncation to max_prompt_tokens
    "prompt_tokens": "int64",  # the tokens the model saw: fewer than the prompt's when it was truncated
    "chat_template_sha256": "string",  # of the tokenizer's chat template; "" without one
    "pred_behavior": "string",
    "pred_label": "string",
    "scores": "string",  # JSON: label -> log-probability (behavior_token and choice strategies)
    "answer": "string",
    "latency_ms": "float64",
}


def typed(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with exactly the prediction columns, in order and of their types."""
    return frame[list(PREDICTION_SCHEMA)].astype(PREDICTION_SCHEMA)


class PredictionStore:
    """The predictions of one agent run (`key`: agent name and run id) under `root`."""

    def __init__(self, root: Location, key: str):
        self.parts_dir = root.child(key)
        self.final = root.child(f"{key}.parquet")

    @property
    def finished(self) -> bool:
        return self.final.exists()

    def done_ids(self) -> set[str]:
        """Task ids that already have a prediction in a part."""
        return {
            task_id
            for part in self.parts_dir.files("part-*.parquet")
            for task_id in part.read_parquet(columns=["task_id"])["task_id"]
        }

    def add(self, rows: pd.DataFrame) -> None:
        self.parts_dir.child(f"part-{uuid.uuid4().hex}.parquet").write_parquet(typed(rows))

    def finalize(self, planned: set[str]) -> None:
        """Write the final file from the parts; it must hold exactly the `planned` task ids."""
        parts = [part.read_parquet() for part in self.parts_dir.files("part-*.parquet")]
        predictions = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(PREDICTION_SCHEMA))
        predictions = predictions.drop_duplicates("task_id", keep="first")
        have = set(predictions["task_id"])
        missing, extra = sorted(planned - have), sorted(have - planned)
        if missing or extra:
            raise HarnessError(
                f"{self.parts_dir}: predictions do not match the planned tasks "
                f"({len(missing)} missing, first {missing[:1]}; {len(extra)} unplanned, first {extra[:1]}); "
                "re-run to complete them"
            )
        self.final.write_parquet(typed(predictions.sort_values("task_id").reset_index(drop=True)))

    def read(self) -> pd.DataFrame:
        return self.final.read_parquet()
