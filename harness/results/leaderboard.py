"""Parquet leaderboards: one tidy table (agent x subset x slice x metric), appended atomically.

A leaderboard is a local file or an object (`s3://bucket/results/leaderboard.parquet`, see
`harness.core.storage.Location`). Rows of a run id already present are replaced, so re-running a finished
evaluation does not duplicate them. Local appends hold an exclusive lock on `PATH.lock`, write a temporary
file and rename it over the table, so concurrent jobs never corrupt it or lose rows. An object is
replaced whole by one PUT, so a reader never sees a partial table, but object stores have no locks: of
two jobs appending to the same object at once, the later PUT wins and the other's rows are lost. Run
appends to one object one at a time, or give concurrent jobs leaderboards of their own.
"""

from __future__ import annotations

import fcntl
import html
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from harness.core.errors import ConfigError
from harness.core.files import write_output
from harness.core.storage import Location, location
from harness.results.charts import Bar, column_help, grouped_bars
from harness.results.metrics import OVERALL, SLICE_PREFIXES, VERSUS, read_table
from harness.results.run_record import code_version

COLUMNS = [
    "run_id",
    "agent",
    "model",
    "mode",
    "design",
    "readout",
    "dataset",
    "split",
    "subset",
    "slice_kind",
    "slice_value",
    "metric",
    "grader",
    "value",
    "stderr",
    "ci_low",
    "ci_high",
    "n",
    "code_version",
    "timestamp",
]
RANK_COLUMNS = {  # ranking column: (subset, slice_kind, slice_value, metric) of the leaderboard rows it shows
    "overall": ("all", OVERALL, "", "macro_f1"),
    "reactive": ("all", "task_type", "reactive", "stayed_on_task"),
    "proactive": ("all", "task_type", "proactive", "intervened_when_should"),
    "restraint": ("all", "task_type", "restraint", "stayed_on_task"),
    "over_intervention": ("all", OVERALL, "", "over_intervention_rate"),
    "missed_intervention": ("all", OVERALL, "", "missed_intervention_rate"),
    "hard": ("hard", OVERALL, "", "macro_f1"),
}
KEY = ["subset", "slice_kind", "slice_value", "metric"]  # what one metrics row of an agent run is
CONTENT_COLUMNS = {  # ranking column: (subset, slice_kind, slice_value, metric) of a grader's content rows
    "caught": ("all", "task_type", "proactive", "caught"),
    "vague_or_wrong": ("all", "task_type", "proactive", "vague_or_wrong"),
}
TABLE_COLUMNS = [
    "rank",
    "agent",
    "mode",
    "design",
    "overall",
    "overall_ci",
    *list(RANK_COLUMNS)[1:],
    "readout",
    *CONTENT_COLUMNS,
    "grader",
]
ADDED = {"readout": "", "grader": ""}  # columns added since the first leaderboards, and what older rows hold
COLUMN_HELP = {
    "rank": "position by overall Macro F1; a repeated rank is a tie: the paired 95% bootstrap interval of the "
    "Macro F1 difference to the agent just above includes 0",
    "agent": "the agent's name in the evaluation config",
    "mode": "zero_shot, instructed (told when to intervene), sft or behaviorsft (behavior tokens)",
    "design": "the behavior-token design of a behaviorsft agent",
    "overall": "Macro F1 of behavior selection (reactive vs proactive) over all tasks of the split",
    "overall_ci": "95% bootstrap interval of overall, resampling clinical cases",
    "reactive": "reactive tasks (answer what was asked): share where the agent stayed on task",
    "proactive": "proactive tasks (something needs flagging): share where the agent intervened, as it should",
    "restraint": "restraint tasks (looks alarming, is not): share where the agent stayed on task",
    "over_intervention": "tasks whose gold behavior is reactive: share where the agent intervened anyway",
    "missed_intervention": "tasks whose gold behavior is proactive: share where the agent did not intervene",
    "hard": "Macro F1 of behavior selection on the BehaviorBench-Hard subset",
    "readout": "how the behavior was read: logprobs (label log-probabilities) or text (the generated answer, by its "
    "behavior token, option letter or the answer rule); both, with counts, when an endpoint gave some of each",
    "caught": "proactive tasks: share where the agent intervened and its answer named the problem",
    "vague_or_wrong": "proactive tasks where the agent intervened: share where its answer named something else or "
    "nothing specific",
    "grader": "who graded caught and vague_or_wrong: evidence (the exact check of the task's evidence) or judge:NAME "
    "(a judge model against the reference answer)",
}
CHART_SERIES = {  # ranking column: legend label of its bar
    "reactive": "reactive: stayed on task",
    "proactive": "proactive: intervened when should",
    "restraint": "restraint: stayed on task",
}


def with_metadata(
    metrics: pd.DataFrame,
    *,
    run_id: str,
    agent: str,
    model: str,
    mode: str,
    design: str,
    readout: str,
    dataset: str,
    split: str,
) -> pd.DataFrame:
    """Metrics rows from `harness.results.metrics.score` with the run's identity columns, in leaderboard order."""
    identity = {"run_id": run_id, "agent": agent, "model": model, "mode": mode, "design": design}
    frame = metrics.assign(
        grader=metrics["grader"].fillna("") if "grader" in metrics.columns else "",
        **identity,
        readout=readout,
        dataset=dataset,
        split=split,
        code_version=code_version(),
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return frame[COLUMNS]


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _board(path: str | Path | Location) -> Location:
    return path if isinstance(path, Location) else location(path, "leaderboard")


def read(path: str | Path | Location) -> pd.DataFrame:
    """The leaderboard at `path`, a local file or an object (empty when there is none); ConfigError when it is
    not one."""
    board = _board(path)
    if not board.exists():
        return pd.DataFrame(columns=COLUMNS)
    try:
        frame = read_table(board)
    except ValueError as exc:
        raise ConfigError(f"{board}: not a leaderboard ({exc})") from None
    if "slice" in frame.columns and "slice_kind" not in frame.columns:  # written before slices were typed
        frame = _typed_slices(frame)
    missing = [c for c in COLUMNS if c not in frame.columns and c not in ADDED]
    if missing:
        raise ConfigError(f"{board}: not a leaderboard (a predictions file? missing columns {', '.join(missing)})")
    frame = frame.assign(**{c: default for c, default in ADDED.items() if c not in frame.columns})[COLUMNS]
    for column in ("value", "stderr", "ci_low", "ci_high"):  # no interval (bootstrap 0) is NaN, not None
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def _typed_slices(frame: pd.DataFrame) -> pd.DataFrame:
    """A leaderboard of the first format, whose slices were names (`type:reactive`), with typed slice columns."""
    kinds = {prefix: kind for kind, prefix in SLICE_PREFIXES.items()}
    split = [(OVERALL, "") if name == OVERALL else name.split(":", 1) for name in frame["slice"].astype(str)]
    frame = frame.drop(columns="slice")
    frame.insert(frame.columns.get_loc("subset") + 1, "slice_kind", [kinds.get(k, k) for k, _ in split])
    frame.insert(frame.columns.get_loc("slice_kind") + 1, "slice_value", [v for _, v in split])
    return frame


def append(path: str | Path, rows: pd.DataFrame) -> None:
    """Add `rows`, replacing any rows of the same run ids; atomic, and safe under concurrency on a local path
    (object stores have no locks: see the module's docstring)."""
    board = _board(path)
    with _locked(Path(board.path)) if board.local else nullcontext():
        existing = read(board)
        kept = existing[~existing["run_id"].isin(rows["run_id"].unique())]
        combined = pd.concat([kept, rows[COLUMNS]], ignore_index=True) if len(kept) else rows[COLUMNS]
        board.write_parquet(combined.reset_index(drop=True))


def _ties_above(rows: pd.DataFrame, agent: str, above: str) -> bool:
    """Whether the paired 95% interval of the Macro F1 difference of `agent` and `above` includes 0."""
    versus = (rows["metric"] == "macro_f1_diff") & (rows["slice_kind"] == VERSUS)
    diff = rows[
        versus
        & (
            ((rows["agent"] == agent) & (rows["slice_value"] == above))
            | ((rows["agent"] == above) & (rows["slice_value"] == agent))
        )
    ]
    return bool(len(diff)) and bool((diff["ci_low"] <= 0).iloc[0] and (diff["ci_high"] >= 0).iloc[0])


def latest_runs(frame: pd.DataFrame, dataset: str | None = None, split: str | None = None) -> pd.DataFrame:
    """The rows of each agent's latest run on one dataset fingerprint and split.

    `dataset` and `split` default to those of the most recent row; `attrs` holds the ones used;
    ValueError when no row matches the ones given.
    """
    chosen = frame
    if dataset is not None:
        chosen = chosen[chosen["dataset"] == dataset]
    if split is not None:
        chosen = chosen[chosen["split"] == split]
    if chosen.empty:
        if not frame.empty:
            raise ValueError(f"no runs on dataset {dataset or 'any'}, split {split or 'any'}")
        chosen = frame.iloc[:0].copy()
        chosen.attrs.update(dataset=dataset, split=split)
        return chosen
    newest = chosen.sort_values("timestamp", kind="stable").iloc[-1]
    chosen = chosen[(chosen["dataset"] == newest["dataset"]) & (chosen["split"] == newest["split"])]
    latest = chosen.sort_values("timestamp", kind="stable").groupby("agent")["run_id"].last()
    chosen = chosen[chosen["run_id"].isin(latest.values)].copy()
    chosen.attrs.update(dataset=str(newest["dataset"]), split=str(newest["split"]))
    return chosen


def ranking(frame: pd.DataFrame, dataset: str | None = None, split: str | None = None) -> pd.DataFrame:
    """Each agent's latest run on one dataset fingerprint and split (see `latest_runs`), best overall Macro F1
    first; `table.attrs` holds the dataset and split used.

    Columns are `TABLE_COLUMNS` (see `COLUMN_HELP`). Walking down the ranking, an agent whose paired
    difference to the agent just above is not significant (its `vs:` row's 95% interval includes 0)
    shares that agent's rank; without paired rows, ranks are 1, 2, 3, ...
    """
    chosen = latest_runs(frame, dataset, split)
    if chosen.empty:
        table = pd.DataFrame(columns=TABLE_COLUMNS)
        table.attrs.update(dataset=chosen.attrs["dataset"], split=chosen.attrs["split"])
        return table
    records = []
    for agent, group in chosen.groupby("agent", sort=True):
        metrics = group[group["grader"] == ""].set_index(KEY)
        record = {key: group[key].iloc[0] for key in ("mode", "design", "readout")} | {"agent": agent}
        for column, key in RANK_COLUMNS.items():
            record[column] = float(metrics.loc[key, "value"]) if key in metrics.index else float("nan")
        record.update(_content(group))
        overall = RANK_COLUMNS["overall"]
        low, high = metrics.loc[overall, ["ci_low", "ci_high"]] if overall in metrics.index else (None, None)
        record["overall_ci"] = "" if pd.isna(low) or pd.isna(high) else f"[{low:.3f}, {high:.3f}]"
        records.append(record)
    table = pd.DataFrame(records).sort_values(["overall", "agent"], ascending=[False, True], na_position="last")
    agents = list(table["agent"])
    ranks: list[int] = []
    for i, agent in enumerate(agents):
        ranks.append(ranks[-1] if i and _ties_above(chosen, agent, agents[i - 1]) else i + 1)
    table.insert(0, "rank", ranks)
    table = table[TABLE_COLUMNS].reset_index(drop=True)
    table.attrs.update(dataset=chosen.attrs["dataset"], split=chosen.attrs["split"])
    return table


def _content(rows: pd.DataFrame) -> dict[str, object]:
    """An agent's content columns, from the exact check when it graded, else from the first judge's grades."""
    graders = sorted(set(rows["grader"]) - {""}, key=lambda g: (g != "evidence", g))
    if not graders:
        return {**dict.fromkeys(CONTENT_COLUMNS, float("nan")), "grader": ""}
    graded = rows[rows["grader"] == graders[0]].set_index(KEY)
    values = {
        column: float(graded.loc[key, "value"]) if key in graded.index else float("nan")
        for column, key in CONTENT_COLUMNS.items()
    }
    return {**values, "grader": graders[0]}


def type_chart(table: pd.DataFrame) -> str:
    """Grouped bars per agent of the per-type shares of tasks with the right behavior."""
    bars = {
        (row["agent"], label): Bar(float(row[column]))
        for row in table.to_dict("records")
        for column, label in CHART_SERIES.items()
    }
    return grouped_bars(
        list(table["agent"]), list(CHART_SERIES.values()), bars, "share of tasks with the right behavior"
    )


def title(table: pd.DataFrame) -> str:
    """Which runs the ranking compares: its dataset fingerprint and split."""
    return f"dataset {table.attrs.get('dataset')}, split {table.attrs.get('split')}"


def render(table: pd.DataFrame, fmt: str) -> str:
    """The ranking as Markdown, CSV or a standalone HTML page explaining each column, with a chart of
    the per-type shares of tasks with the right behavior."""
    if fmt == "md":
        return _markdown(table)
    if fmt == "csv":
        return table.to_csv(index=False, float_format="%.4f")
    if fmt == "html":
        return (
            "<!doctype html><html><head><meta charset='utf-8'><title>BehaviorBench leaderboard</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;text-align:right}"
            "td:nth-child(2),th:nth-child(2){text-align:left}</style></head><body>"
            f"<h1>BehaviorBench leaderboard</h1><p>Runs on {html.escape(title(table))}.</p>"
            + table.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0, na_rep="")
            + column_help(COLUMN_HELP)
            + "<h2>Share of tasks with the right behavior, per task type</h2>"
            + type_chart(table)
            + "</body></html>\n"
        )
    raise ValueError(f"format: {fmt!r} is not one of md, csv, html")


def export(table: pd.DataFrame, path: Path, fmt: str, key: str) -> None:
    """Write the ranking rendered as `fmt` (md, csv or html) to `path`, atomically; a file there that is not an
    export of this format is refused (see `harness.files.write_output`, `key` names the option)."""
    write_output(path, render(table, fmt), key)


def _markdown(table: pd.DataFrame) -> str:
    cells = [[_cell(v) for v in row] for row in table.itertuples(index=False)]
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells]) + "\n"


def _cell(value: object) -> str:
    """A Markdown cell: floats to 3 decimals, and blank where a metric is undefined (NaN: e.g. `vague_or_wrong` of
    an agent that never intervened)."""
    if isinstance(value, float):
        return "" if value != value else f"{value:.3f}"
    return str(value)
