"""Plain-dataclass configs read from YAML plus `key=value` overrides, with errors that name the key."""

from __future__ import annotations

import dataclasses
import datetime
import types
import typing
from collections.abc import Hashable
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import yaml

from harness.core.errors import ConfigError
from harness.core.files import decode_utf8

T = TypeVar("T")


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind))


def _coerce(kind: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(kind):
        return build(kind, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(kind) or (Any,)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_kind, value_kind = typing.get_args(kind) or (Any, Any)
        return {_coerce(key_kind, k, where): _coerce(value_kind, v, f"{where}.{k}") for k, v in value.items()}
    if kind is Any:
        return value
    scalar_ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }
    if kind is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-4 as a string
        except ValueError:
            raise ConfigError(f"{where}: expected float, got {value!r}") from None
    if kind in scalar_ok:
        if not scalar_ok[kind](value):
            # YAML reads `2024` as a number (and `0042` as octal 34): only quotes keep the text as written.
            hint = " (quote it in YAML: '...')" if kind is str and isinstance(value, (bool, int, float)) else ""
            raise ConfigError(f"{where}: expected {_type_name(kind)}, got {value!r}{hint}")
        return float(value) if kind is float else value
    return value


def check_range(
    key: str,
    value: float,
    *,
    low: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> None:
    """ValueError naming `key` unless `low <= value`, `above < value` and `value < below` (each bound optional)."""
    broken = (
        (low is not None and value < low)
        or (above is not None and value <= above)
        or (below is not None and value >= below)
    )
    if broken:
        wanted = [f"at least {low}"] if low is not None else []
        wanted += [f"above {above}"] if above is not None else []
        wanted += [f"below {below}"] if below is not None else []
        raise ValueError(f"{key}: must be {' and '.join(wanted)}, got {value}")


def _key(where: str, key: str) -> str:
    """`FILE: a.b` + `c` -> `FILE: a.b.c`."""
    return f"{where}.{key}" if ": " in where else f"{where}: {key}"


def build(cls: type[T], values: Any, where: str = "config") -> T:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError.

    `where` is the source, optionally followed by ": " and the key path of this section.
    """
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        raise ConfigError(f"{_key(where, unknown[0])}: unknown key (known keys: {', '.join(names)})")
    required = [f.name for f in dataclasses.fields(cls) if _required(f) and f.name not in values]
    if required:
        raise ConfigError(f"{_key(where, required[0])}: missing (a required key)")
    kwargs = {k: _coerce(hints[k], v, _key(where, k)) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, ConfigError) as exc:  # from __post_init__ checks
        raise ConfigError(f"{where}: {exc}") from None


def _required(item: dataclasses.Field) -> bool:
    return item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING


def _field_type(cls: Any, parts: list[str]) -> Any:
    """The declared type of the dotted key `parts` in dataclass `cls`, or None where it is not a known field."""
    for part in parts:
        options = [o for o in typing.get_args(cls) if o is not type(None)] or [cls]
        cls = options[0] if len(options) == 1 else None
        if not dataclasses.is_dataclass(cls):
            return None
        cls = typing.get_type_hints(cls).get(part)
    return cls


def _is_str(kind: Any) -> bool:
    """`str` or `str | None`."""
    optional = typing.get_origin(kind) in (typing.Union, types.UnionType)
    return kind is str or (optional and set(typing.get_args(kind)) == {str, type(None)})


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """` at line L, column C: problem` of a YAML error, on one line."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{where}: {getattr(exc, 'problem', None) or str(exc).splitlines()[0]}"


def apply_overrides(values: dict[str, Any], overrides: list[str], cls: type | None = None) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides (values parsed as YAML) to a nested mapping.

    For a `str` field of dataclass `cls`, a value YAML reads as a number, bool or date stays the text
    given: `run_name=2024` is the name "2024".
    """
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r}: expected key=value")
        key, raw = override.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {override!r}: the value is not valid YAML{_yaml_problem(exc)}") from None
        kind = _field_type(cls, key.split("."))
        if isinstance(value, (int, float, datetime.date)) and _is_str(kind):
            value = raw.strip()
        if kind is not None and not dataclasses.is_dataclass(kind):
            _coerce(kind, value, f"override {override!r}: {key}")  # a wrong type is the override's, not the file's
        set_dotted(values, key, value, f"override {override!r}")
    return values


def set_dotted(values: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    """Set `dotted` (`a.b.c`) in the nested mapping `values`, in place, creating missing sections."""
    node = values
    *parents, last = dotted.split(".")
    if not all([*parents, last]):
        raise ConfigError(f"{where}: {dotted!r} is not a key (empty name between dots)")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {part} is not a section")
    node[last] = value


def get_dotted(values: dict[str, Any], dotted: str) -> Any:
    """The value at `dotted` (`a.b.c`) in a nested mapping, or None when absent."""
    node: Any = values
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping with a repeated key, which PyYAML would resolve to the last value."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`, whose keys the mapping may override
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path, what: str) -> Any:
    """The YAML document at `path`; a problem raises one ConfigError line naming the file (and line, column)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
    try:
        return yaml.load(decode_utf8(data), Loader=_UniqueKeyLoader)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: cannot read {what}: not valid YAML{_yaml_problem(exc)}") from None


def load(cls: type[T], path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read `cls` from a YAML file (or defaults when `path` is None) and apply overrides."""
    where = str(path) if path is not None else "config"
    values = (read_yaml(path, "config") or {}) if path is not None else {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    return build(cls, apply_overrides(values, list(overrides), cls), where)


def _plain(items: list[tuple[str, Any]]) -> dict[str, Any]:
    return {key: value.value if isinstance(value, Enum) else value for key, value in items}


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain YAML-safe values (enums as their values)."""
    return dataclasses.asdict(config, dict_factory=_plain)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys: {"design": {"spelling": "special"}} -> {"design.spelling": "special"}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differing_keys(cls: type, saved: dict[str, Any], current: dict[str, Any], runtime: tuple[str, ...]) -> list[str]:
    """Dotted keys whose values differ between a saved config of dataclass `cls` and `current`, the `runtime` keys
    (and the keys under them) aside. A key the saved config lacks (one added to `cls` since) counts as its
    default, so a config saved by an earlier version still matches."""
    defaults = flatten(to_dict(cls()))
    old, new = {**defaults, **flatten(saved)}, {**defaults, **flatten(current)}
    how_it_runs = tuple(f"{key}." for key in runtime)
    return sorted(
        k
        for k in old.keys() | new.keys()
        if k not in runtime and not k.startswith(how_it_runs) and old.get(k) != new.get(k)
    )
