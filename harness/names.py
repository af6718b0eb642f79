"""Names that become paths (runs, sweeps, agents): checked before anything is written."""

from __future__ import annotations

import re

from harness.errors import ConfigError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(value: object, where: str) -> str:
    """`value` if it is a safe single path component (letters, digits, '.', '_', '-'; no '..'), else ConfigError."""
    if not isinstance(value, str) or not NAME.fullmatch(value) or ".." in value:
        raise ConfigError(
            f"{where}: {value!r} is not a valid name (letters, digits, '.', '_' or '-', starting with a letter "
            "or digit, at most 128 characters, no '..')"
        )
    return value
