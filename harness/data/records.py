"""The BehaviorBench task record and its row-level validation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from harness.data.taxonomy import Taxonomy

ROLES = ("system", "user", "assistant")
SPLITS = ("train", "dev", "test")
MESSAGE_KEYS = {"role", "content", "name"}


@dataclass
class TaskRecord:
    """One BehaviorBench task: a conversation that ends on a user turn, and the behavior it calls for.

    Clinician and patient turns are `user` turns whose content starts with the speaker,
    e.g. ``"Dr. Reyes (attending): ..."``.
    """

    task_id: str
    case_id: str
    category: str
    task_type: str
    messages: list[dict[str, str]]
    gold_behavior: str
    split: str
    hard: bool = False
    reference: str = ""
    # What a correct intervention must name (proactive tasks): requirements, each met by any of its spellings,
    # e.g. [["amlodipine"], ["50 mg", "50mg"], ["5 mg", "5mg"]]. Empty: none known.
    evidence: list[list[str]] = field(default_factory=list)

    def to_row(self) -> dict[str, Any]:
        """The task as a file row (`evidence` only when there is some)."""
        row = asdict(self)
        if not row["evidence"]:
            del row["evidence"]
        return row


REQUIRED = ("task_id", "case_id", "category", "task_type", "messages", "gold_behavior", "split")
OPTIONAL = {"hard": bool, "reference": str, "evidence": list}
STRING_FIELDS = ("task_id", "case_id", "category", "task_type", "gold_behavior", "split")


def _check_messages(messages: object) -> list[tuple[str, str]]:
    if not isinstance(messages, list):
        return [("messages", f"expected a list of {{role, content}}, got {type(messages).__name__}")]
    if not messages:
        return [("messages", "empty conversation")]
    problems = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            problems.append((where, f"expected an object, got {type(message).__name__}"))
            continue
        unknown = set(message) - MESSAGE_KEYS
        if unknown:
            problems.append((where, f"unknown key(s) {sorted(unknown)}"))
        role = message.get("role")
        if role not in ROLES:
            problems.append((f"{where}.role", f"{role!r} is not one of {list(ROLES)}"))
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            problems.append((f"{where}.content", "missing or empty text"))
    if not problems and messages[-1].get("role") != "user":
        problems.append(("messages", "conversation must end on a user turn (the agent answers it)"))
    return problems


def _check_evidence(evidence: list) -> list[tuple[str, str]]:
    """Problems of an `evidence` value: a list of requirements, each a non-empty list of non-empty spellings."""
    problems = []
    for i, requirement in enumerate(evidence):
        where = f"evidence[{i}]"
        if not isinstance(requirement, list) or not requirement:
            problems.append((where, f"expected a non-empty list of spellings, got {requirement!r}"))
        elif not all(isinstance(spelling, str) and spelling.strip() for spelling in requirement):
            problems.append((where, f"every spelling must be non-empty text, got {requirement!r}"))
    return problems


def check_row(row: dict[str, Any], taxonomy: Taxonomy) -> list[tuple[str, str]]:
    """All problems of one row as (field, message); empty when the row is a valid task."""
    problems = [(name, "missing field") for name in REQUIRED if row.get(name) is None]
    for name in STRING_FIELDS:
        value = row.get(name)
        if value is not None and (not isinstance(value, str) or not value):
            problems.append((name, f"expected a non-empty string, got {value!r}"))
    for name, kind in OPTIONAL.items():
        value = row.get(name)
        if value is not None and not isinstance(value, kind):
            problems.append((name, f"expected {kind.__name__}, got {type(value).__name__}"))
    if row.get("messages") is not None:
        problems += _check_messages(row["messages"])
    if isinstance(row.get("evidence"), list):
        problems += _check_evidence(row["evidence"])
    category = row.get("category")
    if isinstance(category, str) and category:
        if category not in taxonomy.categories:
            problems.append(("category", f"unknown category {category!r} (taxonomy {taxonomy.source})"))
        else:
            spec = taxonomy.categories[category]
            task_type = row.get("task_type")
            if isinstance(task_type, str) and task_type and task_type != spec.task_type:
                problems.append(("task_type", f"{task_type!r} but category {category!r} is {spec.task_type!r}"))
            behavior = row.get("gold_behavior")
            if isinstance(behavior, str) and behavior in taxonomy.behaviors and behavior not in spec.behaviors:
                problems.append(("gold_behavior", f"{behavior!r} is not a gold behavior of {category!r}"))
    behavior = row.get("gold_behavior")
    if isinstance(behavior, str) and behavior and behavior not in taxonomy.behaviors:
        problems.append(("gold_behavior", f"unknown behavior {behavior!r} (known: {list(taxonomy.behaviors)})"))
    split = row.get("split")
    if isinstance(split, str) and split and split not in SPLITS:
        problems.append(("split", f"{split!r} is not one of {list(SPLITS)}"))
    return problems


def normalize_row(row: dict[str, Any]) -> dict[str, Any]:
    """A valid row with defaults filled in and only the record's columns, in a fixed order."""
    return {
        "task_id": row["task_id"],
        "case_id": row["case_id"],
        "category": row["category"],
        "task_type": row["task_type"],
        "messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]],
        "gold_behavior": row["gold_behavior"],
        "split": row["split"],
        "hard": bool(row.get("hard") or False),
        "reference": row.get("reference") or "",
        "evidence": [list(requirement) for requirement in row.get("evidence") or []],
    }
