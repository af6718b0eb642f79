"""The `harness` command line: thin commands over the library; user errors exit 1 with one message."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from harness.errors import HarnessError

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Train (BehaviorSFT) and benchmark clinical agents on BehaviorBench with Ray.",
)
data_app = typer.Typer(no_args_is_help=True, help="Make and check BehaviorBench data.")
app.add_typer(data_app, name="data")
console = Console(width=None if sys.stdout.isatty() else 160)
TaxonomyOption = Annotated[Path | None, typer.Option(help="Taxonomy YAML replacing the built-in one.")]


def print_frame(frame, title: str = "") -> None:
    """Render a pandas frame as a table for people."""
    if title:
        console.print(title, highlight=False)
    table = Table()
    for column in frame.columns:
        table.add_column(str(column), justify="right" if frame[column].dtype.kind in "if" else "left")
    for row in frame.itertuples(index=False):
        table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row))
    console.print(table)


@data_app.command("make")
def data_make(
    out: Annotated[Path, typer.Option(help="Directory to write tasks.jsonl into.")] = Path("artifacts/data"),
    tasks: Annotated[int, typer.Option(min=1, help="Number of tasks.")] = 3000,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same bytes.")] = 0,
) -> None:
    """Generate BehaviorBench-mini, the synthetic embedded sample."""
    from harness.bench import summary_frame, validate
    from harness.bench.synth import write_sample

    path = write_sample(out, tasks=tasks, seed=seed)
    result = validate(path)
    print_frame(
        summary_frame(result).groupby(["split", "task_type"], as_index=False)["tasks"].sum(),
        title=f"{path}: {result.good_rows} synthetic tasks",
    )


@data_app.command("validate")
def data_validate(
    path: Annotated[Path, typer.Argument(help="A .jsonl or .parquet file, or a directory of them.")],
    taxonomy: TaxonomyOption = None,
) -> None:
    """Check every row; print `PATH:LINE: field: problem` for each problem (exit 1), else the counts."""
    from harness.bench import load_taxonomy, summary_frame, validate

    result = validate(path, load_taxonomy(taxonomy))
    for problem in result.problems:
        print(problem)
    if result.problems:
        print(
            f"{path}: {len(result.problems)} problem(s) in {result.rejected_lines} row(s); "
            f"{result.good_rows} row(s) valid",
            file=sys.stderr,
        )
        raise typer.Exit(1)
    print_frame(summary_frame(result), title=f"{path}: {result.good_rows} valid tasks")


@app.command()
def demo(out: Annotated[Path, typer.Option(help="Where the demo writes its artifacts.")] = Path("artifacts")) -> None:
    """Run the main job on the embedded default (BehaviorBench-mini)."""
    data_make(out=out / "data", tasks=3000, seed=0)


def main() -> None:
    try:
        app()
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
