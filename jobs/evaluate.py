"""Ray job entrypoint of `harness eval`: `ray job submit --working-dir . -- python jobs/evaluate.py [--root DIR] ARGS`.

Relative paths of the config resolve against `--root` (see `harness.core.storage`), not the job's copy of the code.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir

from harness.cli.jobs import job_main

if __name__ == "__main__":
    sys.exit(job_main("eval", sys.argv[1:]))
