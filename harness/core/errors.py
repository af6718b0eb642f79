"""Errors the harness reports to users as one clear message (never a traceback)."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of `exc`'s message, or its type's name when it has none: for one-line errors."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class HarnessError(Exception):
    """An error a user can fix; the CLI prints it and exits non-zero."""


class ConfigError(HarnessError):
    """A config or taxonomy file is wrong; the message names the file and the key."""


class DataError(HarnessError):
    """A data file is wrong; `problems` holds one `PATH:LINE: field: message` line each."""

    def __init__(self, problems: list[str], summary: str):
        super().__init__("\n".join([summary, *problems]))
        self.problems = problems
        self.summary = summary

    def __reduce__(self) -> tuple[type, tuple[list[str], str]]:  # Ray pickles errors raised in workers
        return (type(self), (self.problems, self.summary))


def _causes(exc: BaseException) -> list[BaseException]:
    """What `exc` wraps: Ray's `.cause`, Ray Train's controller or first worker failure, then Python's chain."""
    wrapped = [
        getattr(exc, "cause", None),
        getattr(exc, "controller_failure", None),
        *[failure for _, failure in sorted((getattr(exc, "worker_failures", None) or {}).items())][:1],
        exc.__cause__,
        None if exc.__suppress_context__ else exc.__context__,
    ]
    return [cause for cause in wrapped if isinstance(cause, BaseException)]


def exception_chain(exc: BaseException) -> list[BaseException]:
    """`exc`, what it wraps, what that wraps, ...: the last one is the root cause."""
    chain = [exc]
    while causes := [c for c in _causes(chain[-1]) if all(c is not seen for seen in chain)]:
        chain.append(causes[0])
    return chain
