"""Predictions: the one owner of their schema and of every file an agent run keeps beside them.

Under an evaluation's output directory (a local directory or an object-store prefix, `Location`), an agent run
whose key is `<agent>-<run id>` keeps:

- `<key>/part-<hex>.parquet`: predictions as they arrive, each part written whole (a renamed local file or one
  object), so a killed job keeps its progress;
- `<key>/error.log`: the traceback of a failed agent;
- `<key>/responses/*.jsonl`: an endpoint agent's responses, each as it arrives (what a re-run does not ask again);
- `<key>/grades.parquet`: the content grades of its proactive answers (task_id, grader, grade);
- `<key>.parquet`: the final predictions, written by `finalize` once the parts hold exactly the planned tasks;
- `<key>.record.json` and `<key>.tracking.json`: its run record and its tracking run id.

So `*.parquet` directly under the output directory are exactly the final predictions.

`scores` is a typed column: a list of `{label, logprob}` structs. Files written before it was (a JSON text
column) still read: `read` converts them.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa

from harness.core.errors import HarnessError
from harness.core.storage import Location

SCORE = pa.struct([("label", pa.string()), ("logprob", pa.float64())])
SCHEMA = pa.schema(
    [
        ("task_id", pa.string()),
        ("case_id", pa.string()),
        ("agent", pa.string()),
        ("category", pa.string()),
        ("task_type", pa.string()),
        ("gold_behavior", pa.string()),
        ("hard", pa.bool_()),
        ("strategy", pa.string()),
        ("prompt", pa.string()),  # the rendered prompt (chat template applied), before truncation to max_prompt_tokens
        ("prompt_tokens", pa.int64()),  # the tokens the model saw: fewer than the prompt's when it was truncated
        ("chat_template_sha256", pa.string()),  # of the tokenizer's chat template; "" without one
        ("pred_behavior", pa.string()),
        ("pred_label", pa.string()),
        ("scores", pa.list_(SCORE)),  # each label's log-probability (behavior_token and choice strategies)
        ("answer", pa.string()),
        ("latency_ms", pa.float64()),
        ("readout", pa.string()),  # logprobs: label log-probabilities chose; text: the generated text did
    ]
)
READOUTS = ("logprobs", "text")
COLUMNS = tuple(SCHEMA.names)
TASK_COLUMNS = ("task_id", "case_id", "category", "task_type", "gold_behavior", "hard")  # copied from the task
SCORED_COLUMNS = ("task_id", "category", "task_type", "gold_behavior", "pred_behavior")  # what metrics need
ERROR = "error"  # a column of predictor output only: a failed row's traceback ("" when it succeeded); never stored


def agent_key(agent: str, run_id: str) -> str:
    """The name of an agent run's files: `<agent>-<run id>`."""
    return f"{agent}-{run_id}"


def scores_column(labels: list[str], logprobs: list[float | None]) -> list[dict[str, object]]:
    """One row's `scores` value: each label with its log-probability (None where it is unknown)."""
    return [{"label": label, "logprob": value} for label, value in zip(labels, logprobs, strict=True)]


def score_map(value: object) -> dict[str, float | None]:
    """A `scores` value (a list of structs, or the JSON text of files from before) as label -> log-probability."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return {}
    if isinstance(value, str):
        return {str(label): None if v is None else float(v) for label, v in json.loads(value or "{}").items()}
    return {str(item["label"]): item["logprob"] for item in value}


@dataclass(frozen=True)
class Prediction:
    """What a predictor produced for one task beyond the task's own columns (`TASK_COLUMNS`)."""

    strategy: str
    prompt: str | None = None
    prompt_tokens: int | None = None
    chat_template_sha256: str | None = None
    pred_behavior: str | None = None
    pred_label: str | None = None
    scores: list[dict[str, object]] | None = None
    answer: str | None = None
    latency_ms: float | None = None
    readout: str | None = None
    error: str = ""


def prediction_batch(tasks: dict[str, list], agent: str, predictions: list[Prediction]) -> dict[str, list]:
    """Ray Data output columns of one agent's predictions for `tasks` (a batch of task columns, row for row)."""
    out: dict[str, list] = {key: list(tasks[key]) for key in TASK_COLUMNS}
    out["hard"] = [bool(h) for h in out["hard"]]
    out["agent"] = [agent] * len(predictions)
    for field in ("strategy", *COLUMNS[COLUMNS.index("prompt") :], ERROR):
        out[field] = [getattr(p, field) for p in predictions]
    return out


def table(frame: pd.DataFrame) -> pa.Table:
    """`frame` with exactly the prediction columns, in order and of their types."""
    frame = upgraded(frame)[list(COLUMNS)]  # a part written by an earlier version joins in the current schema
    # Without pandas' metadata: a batch from Ray Data holds Arrow-backed dtypes that pandas cannot restore on read.
    return pa.Table.from_pandas(frame, schema=SCHEMA, preserve_index=False).replace_schema_metadata(None)


def _as_list(scores: dict[str, float | None]) -> list[dict[str, object]] | None:
    """Scores as the `scores` column holds them; None without any (the `generate` strategy)."""
    return scores_column(list(scores), list(scores.values())) if scores else None


def upgraded(frame: pd.DataFrame) -> pd.DataFrame:
    """Predictions read from any version's file in the current schema: JSON `scores` become typed, and a missing
    `readout` is what the strategy read (only `generate` read text)."""
    if "scores" in frame.columns and len(frame) and frame["scores"].map(lambda v: isinstance(v, str)).any():
        frame = frame.assign(scores=[_as_list(score_map(v)) for v in frame["scores"]])
    if "readout" not in frame.columns and "strategy" in frame.columns:
        frame = frame.assign(readout=["text" if s == "generate" else "logprobs" for s in frame["strategy"]])
    return frame


def readout_summary(frame: pd.DataFrame) -> str:
    """How an agent's behaviors were read, for its leaderboard rows: `logprobs`, `text`, or both with counts."""
    counts = upgraded(frame)["readout"].value_counts()
    if len(counts) == 1:
        return str(counts.index[0])
    return ", ".join(f"{readout} {counts[readout]}" for readout in READOUTS if readout in counts)


def read(location: Location) -> pd.DataFrame:
    """A predictions file (or part) of any version as a frame of the current schema."""
    return upgraded(location.read_parquet())


class PredictionStore:
    """The files of one agent run (`key`, see `agent_key`) under the output directory `root`."""

    def __init__(self, root: Location, key: str):
        self.key = key
        self.parts_dir = root.child(key)
        self.final = root.child(f"{key}.parquet")
        self.record = root.child(f"{key}.record.json")
        self.tracking = root.child(f"{key}.tracking.json")
        self.error_log = self.parts_dir.child("error.log")
        self.responses = self.parts_dir.child("responses")  # an endpoint agent's response cache
        self.grades = self.parts_dir.child("grades.parquet")  # content grades of its proactive answers, by grader

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
        self.parts_dir.child(f"part-{uuid.uuid4().hex}.parquet").write_table(table(rows))

    def finalize(self, planned: set[str]) -> None:
        """Write the final file from the parts; it must hold exactly the `planned` task ids."""
        parts = [read(part) for part in self.parts_dir.files("part-*.parquet")]
        predictions = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(COLUMNS))
        predictions = predictions.drop_duplicates("task_id", keep="first")
        have = set(predictions["task_id"])
        missing, extra = sorted(planned - have), sorted(have - planned)
        if missing or extra:
            raise HarnessError(
                f"{self.parts_dir}: predictions do not match the planned tasks "
                f"({len(missing)} missing, first {missing[:1]}; {len(extra)} unplanned, first {extra[:1]}); "
                "re-run to complete them"
            )
        self.final.write_table(table(predictions.sort_values("task_id").reset_index(drop=True)))

    def read(self) -> pd.DataFrame:
        return read(self.final)

    def write_failure(self, agent: str, error: str) -> str:
        """Save a failed agent's traceback beside its predictions; return the one line to show."""
        self.error_log.write_text(error)
        last = next((line for line in reversed(error.strip().splitlines()) if line.strip()), "unknown error")
        return f"agent {agent}: {last.strip()} (full traceback: {self.error_log})"


def agreement_file(root: Location, judge: str) -> Location:
    """Where a judge's agreement with the exact check is kept, beside the predictions it graded."""
    return root.child(f"judge-{judge}.agreement.json")
