"""Read BehaviorBench files (JSONL, Parquet, or a directory of them), validating every row.

Problems are reported as ``PATH:LINE: field: message`` (LINE is the row number for Parquet),
for the whole file, never stopping at the first one.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from harness.core import storage
from harness.core.errors import DataError, first_line
from harness.core.files import decode_utf8, write_atomic
from harness.data.records import REQUIRED, TaskRecord, check_row, normalize_row
from harness.data.taxonomy import Taxonomy, load_taxonomy

if TYPE_CHECKING:
    import ray.data

SUFFIXES = (".jsonl", ".parquet")
# CPU share of each task that reads, parses or filters tasks: light work. A whole CPU each would not fit beside
# the actors of a node with one CPU (a concurrent sweep trial's, an agent's), and would wait forever there.
PREP_CPUS = 0.25
# Bytes of task files per read block. Ray Data's default splits even a small file into dozens of blocks, one task
# each, and a new driver (a Ray job) starts a worker process per concurrent task: reading 3.6 MB took 8.9 s cold
# in 4 blocks and 4.4 s in one.
BLOCK_BYTES = 32 * 2**20


@dataclass(frozen=True)
class DataFile:
    local: Path  # where this process reads it: the file, or this node's copy of a file at a storage URI
    source: str  # what problems name: the local path, or that URI
    read: str  # what Ray Data's read tasks open, on any node: the local path, or the URI's path in its filesystem


def data_files(path: str | Path) -> list[DataFile]:
    """The data files at `path` (a local path or a storage URI): the file itself, or every .jsonl/.parquet under a
    directory."""
    local = storage.local_data(path)
    remote = storage.location(path, "data") if storage.is_uri(path) else None
    if local.is_dir():
        found = sorted(p for p in local.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not found:
            raise DataError([], f"{path}: no .jsonl or .parquet files in this directory")
        if remote is None:
            return [DataFile(f, str(f), str(f)) for f in found]
        names = [f.relative_to(local).as_posix() for f in found]
        return [DataFile(f, str(remote.child(n)), remote.child(n).path) for f, n in zip(found, names, strict=True)]
    if not local.exists():
        raise DataError([], f"{path}: no such file or directory")
    if local.suffix not in SUFFIXES:
        raise DataError([], f"{path}: unsupported file type {local.suffix!r} (use .jsonl or .parquet)")
    return [DataFile(local, str(path), remote.path if remote else str(local))]


def _parquet_file(file: DataFile) -> pq.ParquetFile:
    """`file` opened as a Parquet table of tasks; a file that is not one raises a one-line DataError."""
    with file.local.open("rb") as handle:
        if handle.read(4) != b"PAR1":
            raise DataError([], f"{file.source}: not a Parquet file (it does not start with PAR1)")
    try:
        table = pq.ParquetFile(file.local)
    except (pa.ArrowException, OSError) as exc:
        raise DataError([], f"{file.source}: truncated or corrupt Parquet file ({first_line(exc)})") from None
    missing = [name for name in REQUIRED if name not in table.schema_arrow.names]
    if missing:
        raise DataError(
            [],
            f"{file.source}: not a BehaviorBench task table: missing column(s) {', '.join(missing)} "
            f"(it has {', '.join(table.schema_arrow.names)})",
        )
    return table


def _raw_rows(file: DataFile) -> Iterator[tuple[int, dict[str, Any] | str, str]]:
    """(line, row, "") for every row of one file, or (line, the line's text, problem) for a line that is no row."""
    if file.local.suffix == ".parquet":
        table = _parquet_file(file)
        line = 0
        try:
            for batch in table.iter_batches(batch_size=4096):
                for row in batch.to_pylist():
                    line += 1
                    yield line, row, ""
        except (pa.ArrowException, OSError) as exc:
            raise DataError([], f"{file.source}: corrupt Parquet file after row {line} ({first_line(exc)})") from None
        return
    with file.local.open("rb") as handle:  # bytes: a line that is not UTF-8 is one bad row, not a failed file
        for line, data in enumerate(handle, start=1):
            raw = data.decode("utf-8", errors="backslashreplace").rstrip("\r\n")  # kept whole in rejects
            try:
                text = decode_utf8(data, name_line=False)
            except ValueError as exc:
                yield line, raw, str(exc)
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                if line == 1 and text.lstrip().startswith("["):  # every line of it would be a bad row
                    raise DataError([], f"{file.source}: a JSON array, not JSON Lines (one object per line)") from None
                yield line, raw, f"malformed JSON: {exc.msg} (column {exc.colno})"
                continue
            if not isinstance(row, dict):
                yield line, raw, f"expected a JSON object, got {type(row).__name__}"
                continue
            yield line, row, ""


@dataclass
class ScanResult:
    """What one pass over the data found: problems, rejected rows, and counts of the good ones."""

    files: list[DataFile]
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # valid rows whose text holds a control-token string
    rejected_lines: int = 0
    good_rows: int = 0
    counts: Counter = field(default_factory=Counter)


def _control_warnings(where: str, row: dict[str, Any], control: re.Pattern[str]) -> list[str]:
    """`where: field: ...` for each text field of a valid row that holds a control-token string."""
    texts = {f"messages[{i}].content": m["content"] for i, m in enumerate(row["messages"])}
    texts["reference"] = row["reference"]
    found = {field: sorted(set(control.findall(text))) for field, text in texts.items()}
    return [
        f"{where}: {field}: holds control token(s) {', '.join(map(repr, tokens))}; the harness encodes them as "
        "plain text, but an endpoint's server may not"
        for field, tokens in found.items()
        if tokens
    ]


def _scan(
    path: str | Path, taxonomy: Taxonomy, on_good=None, on_bad=None, control: re.Pattern[str] | None = None
) -> ScanResult:
    result = ScanResult(files=data_files(path))
    seen: dict[str, str] = {}
    for file in result.files:
        for line, row, problem in _raw_rows(file):
            where = f"{file.source}:{line}"
            if problem:
                issues = [("<row>", problem)]
            else:
                issues = check_row(row, taxonomy)
                task_id = row.get("task_id")
                if isinstance(task_id, str) and task_id:
                    if task_id in seen:
                        issues.append(("task_id", f"duplicate task_id {task_id!r} (first at {seen[task_id]})"))
                    elif not issues:
                        seen[task_id] = where
            if issues:
                result.rejected_lines += 1
                result.problems += [f"{where}: {name}: {message}" for name, message in issues]
                if on_bad is not None:
                    on_bad(where, issues, row)
                continue
            good = normalize_row(row)
            if control is not None:
                result.warnings += _control_warnings(where, good, control)
            result.good_rows += 1
            result.counts[(good["split"], good["task_type"], good["category"])] += 1
            if on_good is not None:
                on_good(good)
    return result


def validate(path: str | Path, taxonomy: Taxonomy | None = None, control: Collection[str] = ()) -> ScanResult:
    """Check every row of every file at `path`; the result lists all problems, and a warning for each text field of a
    valid row that holds one of the `control` strings (control tokens of a model or a token design)."""
    pattern = re.compile("|".join(map(re.escape, sorted(control, key=len, reverse=True)))) if control else None
    return _scan(path, taxonomy or load_taxonomy(), control=pattern)


def summary_frame(result: ScanResult) -> pd.DataFrame:
    """Counts of valid tasks per split, task type and category."""
    rows = [{"split": s, "task_type": t, "category": c, "tasks": n} for (s, t, c), n in sorted(result.counts.items())]
    return pd.DataFrame(rows, columns=["split", "task_type", "category", "tasks"])


class _Rejects:
    """Writes rejected rows, with their problems, to a JSONL file."""

    def __init__(self, path: Path | None):
        self.path = path
        self.handle = None

    def __call__(self, where: str, issues: list[tuple[str, str]], row: Any) -> None:
        if self.path is None:
            return
        if self.handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = self.path.open("w", encoding="utf-8")
        record = {"source": where, "problems": [f"{n}: {m}" for n, m in issues], "row": row}
        self.handle.write(json.dumps(record, default=str) + "\n")

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def _refuse(result: ScanResult, path: str | Path) -> None:
    raise DataError(
        result.problems,
        f"{path}: {len(result.problems)} problem(s) in {result.rejected_lines} row(s); "
        "fix them or pass skip_bad_rows to skip those rows (written to a rejects file)",
    )


def _scan_valid(
    path: str | Path,
    taxonomy: Taxonomy | None,
    on_good: Callable[[dict[str, Any]], None],
    skip_bad_rows: bool,
    rejects_path: str | Path | None,
) -> ScanResult:
    """One pass giving each valid row to `on_good`; bad rows go to `rejects_path`, and refuse the file unless
    `skip_bad_rows`."""
    rejects = _Rejects(Path(rejects_path) if rejects_path else None)
    try:
        result = _scan(path, taxonomy or load_taxonomy(), on_good=on_good, on_bad=rejects)
    finally:
        rejects.close()
    if result.problems and not skip_bad_rows:
        _refuse(result, path)
    return result


def load_tasks(
    path: str | Path,
    taxonomy: Taxonomy | None = None,
    *,
    skip_bad_rows: bool = False,
    rejects_path: str | Path | None = None,
    split: str | None = None,
) -> pd.DataFrame:
    """All valid tasks at `path` as a frame; refuses a file with bad rows unless `skip_bad_rows`."""
    rows: list[dict[str, Any]] = []
    result = _scan_valid(path, taxonomy, rows.append, skip_bad_rows, rejects_path)
    frame = pd.DataFrame(rows)
    if split is not None and len(frame):
        frame = frame[frame["split"] == split].reset_index(drop=True)
    frame.attrs["rejected_rows"] = result.rejected_lines
    return frame


# The columns of `normalize_row`, so that every block of tasks has the same Arrow schema.
TASK_SCHEMA = pa.schema(
    [
        *((name, pa.string()) for name in ("task_id", "case_id", "category", "task_type")),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("gold_behavior", pa.string()),
        ("split", pa.string()),
        ("hard", pa.bool_()),
        ("reference", pa.string()),
        ("evidence", pa.list_(pa.list_(pa.string()))),
    ]
)


def put_split(
    path: str | Path,
    split: str,
    rows_per_block: int,
    taxonomy: Taxonomy | None = None,
    *,
    skip_bad_rows: bool = False,
    rejects_path: str | Path | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[ray.ObjectRef], list[str]]:
    """The valid tasks of `split` at `path` as Arrow blocks of `rows_per_block` rows in the Ray object store, and
    their ids, in file order; `on_row` sees each of them too.

    This process puts each block as its validating pass reads the rows (it holds one block at a time): no Ray
    task reads the data again. Refuses a file with bad rows unless `skip_bad_rows` (then they go to `rejects_path`).
    """
    import ray

    blocks: list[ray.ObjectRef] = []
    rows: list[dict[str, Any]] = []
    ids: list[str] = []

    def put() -> None:
        blocks.append(ray.put(pa.Table.from_pylist(rows, schema=TASK_SCHEMA)))
        rows.clear()

    def keep(row: dict[str, Any]) -> None:
        if row["split"] == split:
            rows.append(row)
            ids.append(row["task_id"])
            if on_row is not None:
                on_row(row)
            if len(rows) == rows_per_block:
                put()

    _scan_valid(path, taxonomy, keep, skip_bad_rows, rejects_path)
    if rows:
        put()
    return blocks, ids


def _blocks(files: list[DataFile]) -> int:
    return max(1, math.ceil(sum(f.local.stat().st_size for f in files) / BLOCK_BYTES))


def load_dataset(
    path: str | Path,
    taxonomy: Taxonomy | None = None,
    *,
    skip_bad_rows: bool = False,
    rejects_path: str | Path | None = None,
    clean_dir: str | Path | None = None,
    num_cpus: float = PREP_CPUS,
) -> ray.data.Dataset:
    """The tasks at `path` as a streaming `ray.data.Dataset` (no process holds them all).

    One streaming validation pass runs first. With bad rows and `skip_bad_rows`, the good rows are
    streamed into a clean JSONL copy under `clean_dir` (default: beside `rejects_path`; one of them is needed)
    and the rejects to `rejects_path`.
    `num_cpus` is what each read and parse task reserves.
    """
    import ray.data

    taxonomy = taxonomy or load_taxonomy()
    result = validate(path, taxonomy)
    files = result.files
    if result.problems:
        if not skip_bad_rows:
            _refuse(result, path)
        if clean_dir is None and rejects_path is None:
            raise ValueError("load_dataset: skipping bad rows needs clean_dir or rejects_path (where the copy goes)")
        clean = Path(clean_dir or Path(rejects_path).parent) / "clean.jsonl"
        rejects = _Rejects(Path(rejects_path) if rejects_path else None)

        def write_clean(tmp: Path) -> None:
            with tmp.open("w", encoding="utf-8") as handle:
                _scan(
                    path,
                    taxonomy,
                    on_good=lambda row: handle.write(json.dumps(TaskRecord(**row).to_row()) + "\n"),
                    on_bad=rejects,
                )

        try:
            write_atomic(clean, write_clean)
        finally:
            rejects.close()
        files = [DataFile(clean, str(clean), str(clean))]
    remote_args: dict[str, Any] = {"num_cpus": num_cpus}
    if result.problems:  # the clean copy is on this node only: its read tasks run here, even on a 0-CPU head
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        remote_args = {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)}
    # Read tasks run on any node: they read a file at a storage URI from there, not this node's copy.
    filesystem = storage.location(str(path), "data").fs if storage.is_uri(files[0].source) else None
    readers = {
        ".jsonl": (ray.data.read_text, lambda r: normalize_row(json.loads(r["text"]))),
        ".parquet": (ray.data.read_parquet, normalize_row),
    }
    parts = []
    for suffix, (read, parse) in readers.items():
        chosen = [f for f in files if f.local.suffix == suffix]
        if chosen:
            options = {"filesystem": filesystem, "ray_remote_args": remote_args, "override_num_blocks": _blocks(chosen)}
            rows = read([f.read for f in chosen], **options)
            parts.append(rows.map(parse, num_cpus=num_cpus))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def fingerprint(path: str | Path) -> str:
    """A short content hash of the data at `path` (for leaderboards and caches)."""
    digest = hashlib.sha256()
    for file in data_files(path):
        digest.update(file.local.name.encode())
        with file.local.open("rb") as handle:
            for chunk in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]
