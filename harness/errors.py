"""Errors the harness reports to users as one clear message (never a traceback)."""


class HarnessError(Exception):
    """An error a user can fix; the CLI prints it and exits non-zero."""


class ConfigError(HarnessError):
    """A config or taxonomy file is wrong; the message names the file and the key."""


class DataError(HarnessError):
    """A data file is wrong; `problems` holds one `PATH:LINE: field: message` line each."""

    def __init__(self, problems: list[str], summary: str):
        super().__init__(summary + "\n" + "\n".join(problems))
        self.problems = problems
