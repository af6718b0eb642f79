"""The BehaviorBench taxonomy: behaviors, task types and categories, loaded from YAML."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from harness.core.config import read_yaml
from harness.core.errors import ConfigError

DEFAULT_TAXONOMY = Path(__file__).with_name("taxonomy.yaml")


@dataclass(frozen=True)
class Category:
    name: str
    task_type: str
    behaviors: tuple[str, ...]
    description: str = ""


@dataclass(frozen=True)
class Taxonomy:
    behaviors: tuple[str, ...]
    task_types: dict[str, str]
    categories: dict[str, Category]
    source: str
    behavior_descriptions: dict[str, str] = field(default_factory=dict)

    def category(self, name: str) -> Category:
        return self.categories[name]

    def behavior_of_type(self, task_type: str) -> str:
        return self.task_types[task_type]

    def behavior_of_category(self, category: str) -> str:
        return self.categories[category].behaviors[0]

    def labels(self, granularity: str) -> tuple[str, ...]:
        """Label set of a granularity: `behavior`, `task_type` or `category`."""
        if granularity == "behavior":
            return self.behaviors
        if granularity == "task_type":
            return tuple(self.task_types)
        if granularity == "category":
            return tuple(self.categories)
        raise ValueError(f"unknown granularity {granularity!r} (known: behavior, task_type, category)")

    def label_of(self, granularity: str, category: str, gold_behavior: str) -> str:
        """The gold label of a task at a granularity."""
        if granularity == "behavior":
            return gold_behavior
        if granularity == "task_type":
            return self.categories[category].task_type
        self.labels(granularity)
        return category

    def behavior_of_label(self, granularity: str, label: str) -> str:
        """Map a label of any granularity back to the behavior it selects."""
        if granularity == "behavior":
            return label
        if granularity == "task_type":
            return self.behavior_of_type(label)
        self.labels(granularity)
        return self.behavior_of_category(label)


def _mapping(value: object, where: str) -> dict:
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{where}: expected a non-empty mapping")
    return value


@cache
def load_taxonomy(path: str | Path | None = None) -> Taxonomy:
    """Read and check a taxonomy file; errors name the file and the key."""
    path = Path(path or DEFAULT_TAXONOMY)
    raw = _mapping(read_yaml(path, "taxonomy"), str(path))
    unknown = set(raw) - {"behaviors", "task_types", "categories"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}")
    described = _mapping(raw.get("behaviors"), f"{path}: behaviors")
    behaviors = tuple(described)
    task_types: dict[str, str] = {}
    for name, spec in _mapping(raw.get("task_types"), f"{path}: task_types").items():
        behavior = _mapping(spec, f"{path}: task_types.{name}").get("behavior")
        if behavior not in behaviors:
            raise ConfigError(f"{path}: task_types.{name}.behavior: {behavior!r} is not one of {behaviors}")
        task_types[name] = behavior
    categories: dict[str, Category] = {}
    for name, spec in _mapping(raw.get("categories"), f"{path}: categories").items():
        spec = _mapping(spec, f"{path}: categories.{name}")
        task_type = spec.get("type")
        if task_type not in task_types:
            raise ConfigError(f"{path}: categories.{name}.type: {task_type!r} is not one of {list(task_types)}")
        listed = spec.get("behaviors") or [task_types[task_type]]
        if not isinstance(listed, list):
            raise ConfigError(f"{path}: categories.{name}.behaviors: expected a list, got {listed!r}")
        labels = tuple(listed)
        bad = [b for b in labels if b not in behaviors]
        if bad:
            raise ConfigError(f"{path}: categories.{name}.behaviors: unknown behavior(s) {bad}")
        categories[name] = Category(name, task_type, labels, str(spec.get("description", "")))
    descriptions = {name: str(text) for name, text in described.items() if text}
    return Taxonomy(behaviors, task_types, categories, str(path), descriptions)
