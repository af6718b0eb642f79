"""Parquet leaderboards: one tidy table (agent x subset x slice x metric), appended atomically.

Appends hold an exclusive lock on `PATH.lock`, write a temporary file and rename it over the table,
so concurrent jobs never corrupt it; rows of a run id already present are replaced, so re-running a
finished evaluation does not duplicate them.
"""

from __future__ import annotations

import fcntl
import html
import subprocess
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

import harness
from harness.files import write_parquet, write_text

COLUMNS = [
    "run_id",
    "agent",
    "model",
    "mode",
    "design",
    "dataset",
    "split",
    "subset",
    "slice",
    "metric",
    "value",
    "stderr",
    "ci_low",
    "ci_high",
    "n",
    "code_version",
    "timestamp",
]
RANK_SLICES = {
    "overall": ("all", "overall"),
    "reactive": ("all", "type:reactive"),
    "proactive": ("all", "type:proactive"),
    "restraint": ("all", "type:restraint"),
    "hard": ("hard", "overall"),
}


def code_version() -> str:
    """The git commit of the harness checkout when there is one, else the package version."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(harness.__file__).parent,
        )
        if sha.returncode == 0 and sha.stdout.strip():
            return sha.stdout.strip()
    except OSError:
        pass
    return harness.__version__


def with_metadata(metrics: pd.DataFrame, **metadata: str) -> pd.DataFrame:
    """Metrics rows from `harness.metrics.score` with the run's identity columns, in leaderboard order."""
    frame = metrics.assign(
        **metadata, code_version=code_version(), timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds")
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


def read(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    return pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=COLUMNS)


def append(path: str | Path, rows: pd.DataFrame) -> None:
    """Add `rows`, replacing any rows of the same run ids; atomic and safe under concurrency."""
    path = Path(path)
    with _locked(path):
        existing = read(path)
        kept = existing[~existing["run_id"].isin(rows["run_id"].unique())]
        combined = pd.concat([kept, rows[COLUMNS]], ignore_index=True) if len(kept) else rows[COLUMNS]
        write_parquet(path, combined.reset_index(drop=True))


def ranking(frame: pd.DataFrame) -> pd.DataFrame:
    """Macro F1 per agent (its latest run): overall with its 95% CI, per type, and on the hard subset."""
    if frame.empty:
        return pd.DataFrame(columns=["rank", "agent", "mode", "design", *RANK_SLICES, "overall_ci"])
    f1 = frame[frame["metric"] == "macro_f1"]
    latest = f1.sort_values("timestamp").groupby("agent")["run_id"].last()
    f1 = f1[f1["run_id"].isin(latest.values)]
    rows = []
    for agent, group in f1.groupby("agent"):
        row = {"agent": agent, "mode": group["mode"].iloc[0], "design": group["design"].iloc[0]}
        for column, (subset, slice_name) in RANK_SLICES.items():
            match = group[(group["subset"] == subset) & (group["slice"] == slice_name)]
            row[column] = float(match["value"].iloc[0]) if len(match) else float("nan")
            if column == "overall" and len(match):
                row["overall_ci"] = f"[{match['ci_low'].iloc[0]:.3f}, {match['ci_high'].iloc[0]:.3f}]"
        rows.append(row)
    table = pd.DataFrame(rows).sort_values("overall", ascending=False).reset_index(drop=True)
    table.insert(0, "rank", range(1, len(table) + 1))
    return table


def _svg_chart(table: pd.DataFrame, types: tuple[str, ...] = ("reactive", "proactive", "restraint")) -> str:
    """Grouped bars of per-type Macro F1 per agent, as inline SVG."""
    colours = ("#4e79a7", "#f28e2b", "#59a14f")
    bar, gap, height, left = 18, 24, 220, 40
    width = left + len(table) * (len(types) * bar + gap) + 160
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 80}" font-size="11">']
    for tick in (0.0, 0.5, 1.0):
        y = 10 + height * (1 - tick)
        parts.append(
            f'<line x1="{left}" y1="{y}" x2="{width - 150}" y2="{y}" stroke="#ddd"/>'
            f'<text x="4" y="{y + 4}">{tick:.1f}</text>'
        )
    for i, row in enumerate(table.itertuples(index=False)):
        x0 = left + i * (len(types) * bar + gap)
        for j, kind in enumerate(types):
            value = getattr(row, kind)
            value = 0.0 if pd.isna(value) else float(value)
            h = height * value
            parts.append(
                f'<rect x="{x0 + j * bar}" y="{10 + height - h}" width="{bar - 2}" height="{h}" '
                f'fill="{colours[j]}"><title>{html.escape(row.agent)} {kind}: {value:.3f}</title></rect>'
            )
        parts.append(
            f'<text x="{x0}" y="{height + 28}" transform="rotate(20 {x0} {height + 28})">'
            f"{html.escape(row.agent)}</text>"
        )
    for j, kind in enumerate(types):
        parts.append(
            f'<rect x="{width - 140}" y="{14 + 16 * j}" width="10" height="10" fill="{colours[j]}"/>'
            f'<text x="{width - 125}" y="{23 + 16 * j}">{kind}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def render(table: pd.DataFrame, fmt: str) -> str:
    """The ranking as Markdown, CSV or a standalone HTML page with a per-type Macro F1 chart."""
    if fmt == "md":
        return _markdown(table)
    if fmt == "csv":
        return table.to_csv(index=False, float_format="%.4f")
    if fmt == "html":
        return (
            "<!doctype html><html><head><meta charset='utf-8'><title>BehaviorBench leaderboard</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;text-align:right}"
            "td:nth-child(2),th:nth-child(2){text-align:left}</style></head><body>"
            "<h1>BehaviorBench leaderboard</h1><p>Macro F1 of behavior selection (test split).</p>"
            + table.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0)
            + "<h2>Macro F1 per task type</h2>"
            + _svg_chart(table)
            + "</body></html>\n"
        )
    raise ValueError(f"format: {fmt!r} is not one of md, csv, html")


def export(table: pd.DataFrame, path: Path, fmt: str) -> None:
    """Write the ranking rendered as `fmt` (md, csv or html) to `path`, atomically."""
    write_text(path, render(table, fmt))


def _markdown(table: pd.DataFrame) -> str:
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells]) + "\n"
