"""Inline SVG charts and the column help of HTML pages: the leaderboard export and the report use the same ones."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

PALETTE = (  # Tableau 10: one colour per series, repeated after ten
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)


def colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


@dataclass(frozen=True)
class Bar:
    """One bar: a share in [0, 1], its 95% interval when known, and what its tooltip adds."""

    value: float
    low: float | None = None
    high: float | None = None
    note: str = ""


def _missing(value: float | None) -> bool:
    return value is None or math.isnan(value)


def grouped_bars(
    groups: list[str], series: list[str], bars: dict[tuple[str, str], Bar], y_label: str, x_label: str = ""
) -> str:
    """Grouped bars as inline SVG: one group per entry of `groups`, one bar per entry of `series` (the legend),
    heights from `bars[(group, series)]` (absent: no bar), with interval lines where a bar has one."""
    bar, gap, top, height, left, bottom = 14, 18, 20, 240, 70, 170
    group_width = len(series) * bar + gap
    plot_right = left + len(groups) * group_width
    legend_x = plot_right + 20
    width, total = legend_x + 240, top + height + bottom

    def y(share: float) -> float:
        return top + height * (1 - share)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total}" font-size="12">']
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(
            f'<line x1="{left}" y1="{y(tick)}" x2="{plot_right}" y2="{y(tick)}" stroke="#ddd"/>'
            f'<text x="{left - 8}" y="{y(tick) + 4}" text-anchor="end">{tick:.2f}</text>'
        )
    parts.append(
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + height}" stroke="#333"/>'
        f'<line x1="{left}" y1="{top + height}" x2="{plot_right}" y2="{top + height}" stroke="#333"/>'
        f'<text x="16" y="{top + height / 2}" text-anchor="middle" transform="rotate(-90 16 {top + height / 2})">'
        f"{html.escape(y_label)}</text>"
        f'<text x="{(left + plot_right) / 2}" y="{total - 6}" text-anchor="middle">{html.escape(x_label)}</text>'
    )
    intervals = False
    for i, group in enumerate(groups):
        x0 = left + i * group_width + gap // 2
        for j, name in enumerate(series):
            shown = bars.get((group, name))
            if shown is None or _missing(shown.value):
                continue
            x = x0 + j * bar
            interval = "" if _missing(shown.low) or _missing(shown.high) else f" [{shown.low:.3f}, {shown.high:.3f}]"
            parts.append(
                f'<rect x="{x}" y="{y(shown.value):.1f}" width="{bar - 1}" height="{height * shown.value:.1f}" '
                f'fill="{colour(j)}"><title>{html.escape(name)}, {html.escape(group)}: {shown.value:.3f}{interval}'
                f"{html.escape(shown.note)}</title></rect>"
            )
            if interval:
                intervals = True
                parts.append(
                    f'<line x1="{x + bar / 2}" y1="{y(shown.low):.1f}" x2="{x + bar / 2}" y2="{y(shown.high):.1f}" '
                    'stroke="#333"/>'
                )
        label_x, label_y = x0 + len(series) * bar / 2, top + height + 14
        parts.append(
            f'<text x="{label_x}" y="{label_y}" transform="rotate(40 {label_x} {label_y})">{html.escape(group)}</text>'
        )
    for j, name in enumerate(series):
        parts.append(
            f'<rect x="{legend_x}" y="{top + 20 * j}" width="14" height="14" fill="{colour(j)}"/>'
            f'<text x="{legend_x + 20}" y="{top + 20 * j + 12}">{html.escape(name)}</text>'
        )
    if intervals:
        parts.append(f'<text x="{legend_x}" y="{top + 20 * len(series) + 14}">lines: 95% bootstrap interval</text>')
    parts.append("</svg>")
    return '<div class="chart">' + "".join(parts) + "</div>"


def column_help(help_by_column: dict[str, str]) -> str:
    """What each column means, as an HTML list."""
    items = "".join(f"<li><b>{html.escape(c)}</b>: {html.escape(text)}</li>" for c, text in help_by_column.items())
    return f"<ul>{items}</ul>"
