"""Names that become paths (runs, sweeps, agents): checked before anything is written."""

from __future__ import annotations

import re

from harness.errors import ConfigError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def name_problem(value: object) -> str | None:
    """Why `value` is not a safe single path component, or None when it is one."""
    if isinstance(value, str) and NAME.fullmatch(value) and ".." not in value:
        return None
    return (
        f"{value!r} is not a valid name (letters, digits, '.', '_' or '-', starting with a letter or digit, "
        "at most 128 characters, no '..')"
    )


def check_name(value: object, where: str) -> str:
    """`value` if it is a safe name, else ConfigError naming `where`."""
    problem = name_problem(value)
    if problem:
        raise ConfigError(f"{where}: {problem}")
    return str(value)


def reference_problem(reference: str) -> str | None:
    """What is wrong with the form of a model reference `run:NAME` or `sweep:NAME:best` (None: nothing, or it
    is another kind of reference)."""
    if reference.startswith("run:"):
        return name_problem(reference[4:])
    if reference.startswith("sweep:"):
        parts = reference.split(":")
        return name_problem(parts[1]) if len(parts) == 3 and parts[2] == "best" else "expected sweep:<sweep name>:best"
    return None
