"""Names that become paths (runs, sweeps, agents): checked before anything is written."""

from __future__ import annotations

import re

from harness.core.errors import ConfigError

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
