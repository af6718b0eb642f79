"""BehaviorBench: the task record, the taxonomy, loaders and the embedded BehaviorBench-mini sample."""

from harness.bench.io import data_files, fingerprint, load_dataset, load_tasks, summary_frame, validate
from harness.bench.records import TaskRecord
from harness.bench.taxonomy import Taxonomy, load_taxonomy

__all__ = [
    "TaskRecord",
    "Taxonomy",
    "data_files",
    "fingerprint",
    "load_dataset",
    "load_tasks",
    "load_taxonomy",
    "summary_frame",
    "validate",
]
