"""Ray job entry points: `jobs/*.py` call `job_main`, which runs one `harness` command in the job's driver."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from harness.cli.main import run
from harness.core.storage import ROOT_ENV, is_uri


def job_main(command: str, argv: list[str]) -> int:
    """A Ray job entrypoint: `harness COMMAND ARGS`, where `--root DIR` (anywhere in ARGS) sets the storage root."""
    parser = argparse.ArgumentParser(prog=f"jobs {command}", add_help=False, allow_abbrev=False)
    parser.add_argument("--root", help="the storage root: a directory the job can reach, or a URI")
    known, rest = parser.parse_known_args(argv)
    if known.root is not None:
        if not is_uri(known.root) and not Path(known.root).expanduser().is_dir():
            print(f"error: --root {known.root}: no such directory on this node", flush=True)
            return 1
        os.environ[ROOT_ENV] = known.root
    return run([command, *rest])
