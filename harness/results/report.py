"""One self-contained HTML page of an evaluation: the ranking, the paired comparisons, a per-category chart,
an example of each content grade per agent and the tasks where agents disagree (inline CSS and SVG; nothing is
fetched).

The page shows each agent's latest run on one dataset fingerprint and split (those of `leaderboard.ranking`);
its predictions are `<predictions dir>/<agent>-<run id>.parquet`, as `harness eval` writes them.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness.core.errors import HarnessError
from harness.core.files import write_output
from harness.core.storage import Location, location
from harness.data.io import fingerprint, load_tasks
from harness.data.taxonomy import load_taxonomy
from harness.results import leaderboard
from harness.results.charts import Bar, column_help, grouped_bars
from harness.results.content import EVIDENCE, GRADES
from harness.results.metrics import SHARE_METRICS, VERSUS, check_predictions, read_table
from harness.results.predictions import COLUMNS, PredictionStore, agent_key, score_map, upgraded

RANKING_HEADER = "#1d3557"  # background of the ranking table's header row
SIGNIFICANT = {"better": "#c8e6c9", "worse": "#ffcdd2"}  # paired cells whose 95% interval excludes 0
CATEGORY_METRICS = ("accuracy", *SHARE_METRICS.values())  # per category: share of tasks with the right behavior
STYLE = f"""
body{{font-family:sans-serif;margin:2em;max-width:1250px;color:#222}}
table{{border-collapse:collapse;margin:0.5em 0}}
td,th{{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right;vertical-align:top}}
th{{background:#e9ecef;text-align:center}}
#ranking th{{background:{RANKING_HEADER};color:#fff}}
td.name{{text-align:left}}
td.sig-better{{background:{SIGNIFICANT["better"]}}}
td.sig-worse{{background:{SIGNIFICANT["worse"]}}}
.chart{{overflow-x:auto}}
details{{border:1px solid #ddd;border-radius:4px;padding:4px 8px;margin:4px 0}}
summary{{cursor:pointer}}
.message{{margin:4px 0;padding:4px 8px;background:#f6f6f6;border-left:3px solid #aaa}}
.message.assistant{{border-color:#4e79a7}}
.text{{white-space:pre-wrap}}
td.text{{text-align:left;max-width:520px}}
.right{{color:#1b5e20}}
.wrong{{color:#b71c1c}}
small{{color:#555}}
"""


@dataclass
class Report:
    """The inputs of the page: the ranking and, per ranked agent, its latest run's rows and predictions."""

    ranking: pd.DataFrame
    rows: dict[str, pd.DataFrame]  # agent -> its latest run's leaderboard rows
    predictions: dict[str, pd.DataFrame]  # agent -> that run's predictions
    files: dict[str, Location]  # agent -> its predictions file
    grades: dict[str, pd.DataFrame]  # agent -> that run's content grades (task_id, grader, grade), if graded
    tasks: pd.DataFrame  # the split's tasks from the data file, indexed by task_id
    source: Location  # the leaderboard file


def _fmt(value: float) -> str:
    return "n/a" if pd.isna(value) else f"{value:.3f}"


def _p_value(p: float) -> str:
    return "p n/a" if pd.isna(p) else "p<0.001" if p < 0.001 else f"p={p:.3f}"


def _table(header: list[str], rows: list[list[str]], attrs: str = "") -> str:
    """An HTML table of cells that are already HTML (a cell given as `<td ...>` keeps its own tag)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(cell if cell.startswith("<td") else f"<td>{cell}</td>" for cell in row) + "</tr>"
        for row in rows
    )
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _name(text: str) -> str:
    return f'<td class="name">{html.escape(text)}</td>'


def _text(value: object) -> str:
    return "" if value is None or pd.isna(value) else str(value)


def read_predictions(path: Location) -> pd.DataFrame:
    """One agent run's predictions; HarnessError naming `path` when it is missing or not a predictions file."""
    if not path.exists():
        raise HarnessError(f"{path}: no such predictions file (the leaderboard's latest run of this agent)")
    try:
        frame = upgraded(read_table(path))
        missing = [c for c in COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"not a predictions file: missing column(s) {', '.join(missing)}")
        check_predictions(frame)
    except ValueError as exc:
        raise HarnessError(f"{path}: {exc}") from None
    return frame


def load(
    board_path: str | Path,
    predictions_path: str | Path,
    data: str | Path,
    dataset: str | None = None,
    split: str | None = None,
    taxonomy: Path | None = None,
) -> Report:
    """Read what the page shows (the leaderboard and predictions may be objects in a bucket); every missing or
    unreadable input raises a one-line HarnessError naming it."""
    board, predictions_dir = location(board_path, "--leaderboard"), location(predictions_path, "--predictions")
    if not board.exists():
        raise HarnessError(f"{board}: no leaderboard yet (run `harness eval` first)")
    try:
        runs = leaderboard.latest_runs(leaderboard.read(board), dataset=dataset, split=split)
    except ValueError as exc:
        raise HarnessError(f"{board}: {exc}") from None
    if runs.empty:
        raise HarnessError(f"{board}: the leaderboard has no rows")
    ranking = leaderboard.ranking(runs)
    dataset, split = runs.attrs["dataset"], runs.attrs["split"]
    data_id = fingerprint(data)
    if data_id != dataset:
        raise HarnessError(
            f"{data}: fingerprint {data_id} is not the ranked runs' dataset {dataset} "
            "(pass the data the agents were evaluated on, or --dataset)"
        )
    rows = {agent: runs[runs["agent"] == agent] for agent in ranking.agent}
    run_ids = {agent: agent_rows["run_id"].iloc[0] for agent, agent_rows in rows.items()}
    stores = {agent: PredictionStore(predictions_dir, agent_key(agent, run_id)) for agent, run_id in run_ids.items()}
    files = {agent: store.final for agent, store in stores.items()}
    predictions = {agent: read_predictions(path) for agent, path in files.items()}
    grades = {agent: store.grades.read_parquet() for agent, store in stores.items() if store.grades.exists()}
    # Rows that fail validation are skipped, as an evaluation with skip_bad_rows did: none of them was predicted.
    tasks = load_tasks(data, load_taxonomy(taxonomy), skip_bad_rows=True, split=split)
    tasks = tasks.set_index("task_id") if len(tasks) else tasks
    for agent, agent_predictions in predictions.items():
        unknown = sorted(set(agent_predictions["task_id"]) - set(tasks.index))
        if unknown:
            raise HarnessError(
                f"{data}: no valid {split} task {unknown[0]!r} (predicted in {files[agent]}; "
                f"see `harness data validate {data}`)"
            )
    return Report(ranking, rows, predictions, files, grades, tasks, board)


def _ranking_html(report: Report) -> str:
    table = report.ranking
    cells = [
        [_name(v) if c == "agent" else _fmt(v) if isinstance(v, float) else html.escape(str(v)) for c, v in row.items()]
        for _, row in table.iterrows()
    ]
    return (
        _table([html.escape(c) for c in table.columns], cells, ' id="ranking"')
        + f"<details><summary>What the columns mean</summary>{column_help(leaderboard.COLUMN_HELP)}</details>"
    )


def _paired_html(report: Report) -> str:
    agents = list(report.ranking.agent)
    rows = []
    for a in agents:
        metrics = report.rows[a].set_index(["slice_kind", "slice_value", "metric"])
        cells = [_name(a)]
        for b in agents:
            diff_key, p_key = (VERSUS, b, "macro_f1_diff"), (VERSUS, b, "mcnemar_p")
            if a == b or diff_key not in metrics.index:
                cells.append("—" if a == b else '<small title="not compared in the same evaluation">n/a</small>')
                continue
            diff, p = metrics.loc[diff_key], metrics.loc[p_key, "value"] if p_key in metrics.index else float("nan")
            kind = ' class="sig-better"' if diff.ci_low > 0 else ' class="sig-worse"' if diff.ci_high < 0 else ""
            cells.append(
                f"<td{kind}>{diff.value:+.3f}{' *' if kind else ''}<br>"
                f"<small>[{_fmt(diff.ci_low)}, {_fmt(diff.ci_high)}] {_p_value(p)}</small></td>"
            )
        rows.append(cells)
    return (
        _table(["row minus column", *(html.escape(b) for b in agents)], rows, ' id="paired"')
        + "<p><small>Each cell: overall Macro F1 of the row agent minus the column agent, its paired 95% bootstrap "
        "interval (the same case draws for both) and the exact McNemar p-value. * and a coloured cell: the "
        "interval excludes 0 (green: the row agent is better, red: worse). n/a: the two were not scored on the "
        "same tasks in one evaluation.</small></p>"
    )


def category_shares(report: Report) -> pd.DataFrame:
    """Per agent and category: the share of tasks with the right behavior (value, ci_low, ci_high, n)."""
    frames = []
    for agent, rows in report.rows.items():
        shares = rows[
            (rows["subset"] == "all") & (rows["slice_kind"] == "category") & rows["metric"].isin(CATEGORY_METRICS)
        ]
        frames.append(shares.assign(category=shares["slice_value"], agent=agent))
    columns = ["agent", "category", "value", "ci_low", "ci_high", "n"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def _chart_svg(report: Report) -> str:
    """Grouped bars, one group per category (ordered by task type), one bar per agent, with 95% intervals."""
    shares = category_shares(report)
    types = pd.concat(p[["category", "task_type"]] for p in report.predictions.values()).drop_duplicates("category")
    ordered = types.sort_values(["task_type", "category"])
    groups = {c: f"{c} ({t})" for c, t in zip(ordered.category, ordered.task_type, strict=True)}
    bars = {
        (groups[row.category], row.agent): Bar(row.value, row.ci_low, row.ci_high, f" of {row.n} tasks")
        for row in shares.itertuples()
        if row.category in groups
    }
    return grouped_bars(
        list(groups.values()),
        list(report.ranking.agent),
        bars,
        "share of tasks with the right behavior",
        "category (task type)",
    )


def disagreements(report: Report) -> list[str]:
    """Task ids where the agents' chosen behaviors differ (among the agents that predicted the task), sorted."""
    choices = pd.concat(frame.set_index("task_id")["pred_behavior"] for frame in report.predictions.values())
    per_task = choices.groupby(level=0).nunique()
    return sorted(per_task[per_task > 1].index)


def _scores(value: object) -> str:
    """Label scores, best first (unknown ones last)."""
    ordered = sorted(score_map(value).items(), key=lambda item: -float("inf") if item[1] is None else -item[1])
    return "<br>".join(
        f"{html.escape(label)} {'n/a' if logprob is None else f'{logprob:.3f}'}" for label, logprob in ordered
    )


def _sample_html(report: Report, task_id: str, by_task: dict[str, dict[str, dict]]) -> str:
    """One task in a <details>: its conversation, gold behavior and each agent's prediction (`by_task`: agent ->
    task id -> prediction)."""
    task = report.tasks.loc[task_id]
    gold = str(task["gold_behavior"])
    rows, marks = [], []
    for agent, predictions in by_task.items():
        if task_id not in predictions:
            continue
        pred = predictions[task_id]
        right = pred["pred_behavior"] == gold
        mark = f'<span class="{"right" if right else "wrong"}">{html.escape(str(pred["pred_behavior"]))}</span>'
        marks.append(f"{html.escape(agent)}: {mark}")
        label = _text(pred["pred_label"])
        label = f"<br><small>label {html.escape(label)}</small>" if label and label != pred["pred_behavior"] else ""
        rows.append(
            [
                _name(agent),
                mark + label,
                html.escape(str(pred["strategy"])),
                _scores(pred["scores"]),
                f'<td class="text">{html.escape(_text(pred["answer"]))}</td>',
            ]
        )
    messages = "".join(
        f'<div class="message {html.escape(m["role"])}"><b>{html.escape(m["role"])}</b>'
        f'<div class="text">{html.escape(m["content"])}</div></div>'
        for m in task["messages"]
    )
    reference = _text(task["reference"])
    if reference:
        messages += f'<p><b>reference answer</b></p><div class="text">{html.escape(reference)}</div>'
    hard = " · hard" if bool(task["hard"]) else ""
    return (
        f"<details><summary><b>{html.escape(task_id)}</b> · {html.escape(str(task['category']))}{hard} · "
        f"gold <b>{html.escape(gold)}</b> · {', '.join(marks)}</summary>{messages}"
        + _table(["agent", "choice", "strategy", "scores", "answer"], rows)
        + "</details>"
    )


def _grade_examples_html(report: Report) -> str:
    """Per graded agent, its first task (by id) of each content grade, its answer beside the reference answer."""
    sections = []
    for agent, grades in report.grades.items():
        graders = sorted(set(grades["grader"]), key=lambda g: (g != EVIDENCE, g))
        graded = grades[grades["grader"] == graders[0]].sort_values("task_id") if graders else grades
        answers = report.predictions[agent].set_index("task_id")["answer"]
        rows = []
        for grade in GRADES:
            chosen = graded[graded["grade"] == grade]
            if not len(chosen):
                rows.append([html.escape(grade), "", '<td class="text">(no answer has this grade)</td>', ""])
                continue
            task_id = str(chosen["task_id"].iloc[0])
            rows.append(
                [
                    html.escape(grade),
                    html.escape(task_id),
                    f'<td class="text">{html.escape(_text(answers.get(task_id)))}</td>',
                    f'<td class="text">{html.escape(_text(report.tasks.loc[task_id, "reference"]))}</td>',
                ]
            )
        grader = html.escape(graders[0]) if graders else ""
        sections.append(
            f"<h3>{html.escape(agent)} <small>graded by {grader}</small></h3>"
            + _table(["grade", "task", "answer", "reference answer"], rows)
        )
    if not sections:
        return "<p>No content grades: the agents were evaluated without <code>content</code>.</p>"
    return (
        "<p>On proactive tasks, what an intervention said: <b>caught</b> names the problem, <b>wrong</b> names part "
        "of it, <b>vague</b> names none of it, <b>none</b> did not intervene. One example of each per agent.</p>"
        + "".join(sections)
    )


def _samples_html(report: Report, max_samples: int) -> str:
    ids = disagreements(report)
    total = len(report.tasks)
    shown = ids[:max_samples]
    by_task = {agent: frame.set_index("task_id").to_dict("index") for agent, frame in report.predictions.items()}
    left_out = len(ids) - len(shown)
    files = "".join(f"<li>{html.escape(a)}: {html.escape(str(p))}</li>" for a, p in report.files.items())
    note = f" The first {len(shown)} by task id are shown; {left_out} more are left out." if left_out else ""
    return (
        f"<p>The agents chose different behaviors on {len(ids)} of {total} tasks.{note} Each opens to its "
        f"conversation, the gold behavior and every agent's choice, scores and answer.</p>"
        f"<details><summary>Prediction files</summary><ul>{files}</ul></details>"
        + "".join(_sample_html(report, task_id, by_task) for task_id in shown)
    )


def render(report: Report, max_samples: int = 200) -> str:
    """The page as one HTML string (no scripts, no external resources; every text escaped)."""
    what = f"dataset {report.ranking.attrs['dataset']}, split {report.ranking.attrs['split']}"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>BehaviorBench report</title>"
        f"<style>{STYLE}</style></head><body>"
        f"<h1>BehaviorBench report</h1><p>Each agent's latest run on {html.escape(what)}, from "
        f"{html.escape(str(report.source))}.</p>"
        "<h2>Ranking</h2><p>Macro F1 of behavior selection, with its 95% bootstrap interval (resampling clinical "
        "cases), and the per-type shares of tasks with the right behavior.</p>"
        + _ranking_html(report)
        + "<h2>Paired comparisons</h2>"
        + _paired_html(report)
        + "<h2>Per category: share of tasks with the right behavior</h2>"
        + _chart_svg(report)
        + "<h2>What the interventions said</h2>"
        + _grade_examples_html(report)
        + "<h2>Tasks where the agents disagree</h2>"
        + _samples_html(report, max_samples)
        + "</body></html>\n"
    )


def write(report: Report, out: Path, max_samples: int = 200) -> None:
    """Render the page and write it to `out` atomically; a file there that is not such a page is refused."""
    write_output(out, render(report, max_samples), "--out")
