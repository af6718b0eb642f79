"""Ray job entrypoint: `harness demo` for `ray job submit --working-dir . -- python jobs/pipeline.py ARGS`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir

from harness.cli import run

if __name__ == "__main__":
    sys.exit(run(["demo", *sys.argv[1:]]))
