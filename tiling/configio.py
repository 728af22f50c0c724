"""Typed configs from YAML files and `key=value` overrides, with errors that name the offending key.

Shared by the tiler and the trainer: a config is a (nested) frozen dataclass; a YAML mapping fills it; unknown keys
and wrongly typed values are errors before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import yaml

from tiling.errors import PathdinoError

T = TypeVar("T")


class ConfigError(PathdinoError, ValueError):
    """A config file, override or value that does not fit the config's schema.

    The one error type of every config in the project (tiling, data, models, train): messages name the key at
    fault (``section.field=value``) and what would be valid; ``key`` holds the dotted key when it is known.
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


# ----------------------------------------------------------------------------------------------------------------
# Field checks for the configs' __post_init__ (one message format: "Owner.field=value is invalid: expected ...").
# Cross-section checks (several sections, the launch, the stores) live in each package's validate_* function.


def fail(owner: str, name: str, value: Any, expected: str) -> NoReturn:
    """Raise ConfigError ``"{owner}.{name}={value!r} is invalid: {expected}"``."""
    raise ConfigError(f"{owner}.{name}={value!r} is invalid: {expected}", key=f"{owner}.{name}")


def check_choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        fail(owner, name, value, f"expected one of {choices}")


def check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(owner, name, value, f"expected an integer >= {minimum}")


def check_prob(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        fail(owner, name, value, "expected a probability in [0, 1]")


def check_range(owner: str, name: str, value: Any, low: float, high: float, strict_order: bool = False) -> None:
    """A ``(min, max)`` pair with ``low <= min <= max <= high`` (``min < max`` with ``strict_order``)."""
    ok = isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
    if ok:
        ok = low <= value[0] <= value[1] <= high and (value[0] < value[1] or not strict_order)
    if not ok:
        fail(owner, name, value, f"expected (min, max) with {low} <= min <= max <= {high}")


def freeze_tuples(obj: Any, names: tuple[str, ...]) -> None:
    """Frozen dataclasses: lists from YAML/CLI become tuples, so configs stay hashable and immutable."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, list):
            object.__setattr__(obj, name, tuple(value))


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (["a", "b", "c"], value parsed as YAML: numbers, booleans, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. optim.base_lr=1e-3)")
    key, value = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r}: empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(
            f"override {text!r}: the value is not valid YAML ({problem}); quote it, e.g. "
            f"'{key.strip()}=\"...\"', or close its brackets",
            key=key.strip(),
        ) from None
    return key.strip().split("."), parsed


def set_key(data: dict[str, Any], keys: list[str], value: Any, *, what: str) -> None:
    """Set ``data[k0][k1]...[kn] = value`` in place, creating sections; ``what`` names the override in errors."""
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {what!r}: {k!r} is not a section", key=".".join(keys))
    node[keys[-1]] = value


def apply_overrides(
    data: dict[str, Any], overrides: list[str] | None = None, values: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``key=value`` text override applied (nested keys with dots, values
    parsed as YAML), then each already-typed ``values[key]`` (command-line flags; ``None`` means "not given")."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides or []:
        keys, value = parse_override(text)
        set_key(out, keys, value, what=text)
    for key, value in (values or {}).items():
        if value is not None:
            set_key(out, key.split("."), value, what=f"{key}={value}")
    return out


def load_config(
    cls: type[T],
    path: str | Path | None,
    overrides: list[str] | None = None,
    *,
    values: dict[str, Any] | None = None,
    where: str | None = None,
) -> T:
    """YAML file (if any), then ``key=value`` overrides, then typed flag values -> dataclass ``cls``.

    The one way every command builds its config; ConfigError names the file and key on any problem.
    """
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides, values)
    where = where or (str(path) if path is not None else "config")
    try:
        return from_dict(cls, data, where)
    except ConfigError as exc:
        raise blame_override(exc, where, overrides) from exc.__cause__


def blame_override(exc: ConfigError, where: str, overrides: list[str] | None) -> ConfigError:
    """``exc`` (from ``from_dict(..., where)``) reworded to name the ``key=value`` override at fault when the key it
    is about was given on the command line, rather than the config file; else ``exc`` itself."""
    msg = str(exc)
    for text in reversed(overrides or []):
        key = text.split("=", 1)[0].strip()
        parent, _, leaf = key.rpartition(".")
        head = f"{where}.{key}"
        unknown = msg.startswith(f"{where}.{parent}: unknown key" if parent else f"{where}: unknown key")
        if (
            msg.startswith((head + ":", head + ".", head + "["))
            or (unknown and repr(leaf) in msg.split(";")[0])
            or (exc.key or "").endswith("." + leaf)
            and msg.startswith(f"{where}.{parent}:")
        ):
            detail = msg[len(where) :].lstrip(".: ")
            return ConfigError(f"override {text!r} (command line): {detail}", key=key)
    return exc


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        return from_dict(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_hint = args[0] if args else Any
        items = [_coerce(v, item_hint, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads 2e-4 as a string; accept any float literal Python does
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a mapping; unknown keys and bad types raise ConfigError naming the key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    for name, f in fields.items():
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kind = "section" if dataclasses.is_dataclass(hints[name]) else "key"
            help_ = f" ({f.metadata['help']})" if "help" in f.metadata else ""
            raise ConfigError(f"{where}: missing {kind} {name!r}{help_}", key=name)
    kwargs = {name: _coerce(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # a __post_init__ check: say which file / section it came from
        raise ConfigError(f"{where}: {exc}", key=exc.key) from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def to_dict(obj: Any) -> Any:
    """A dataclass (nested) as plain JSON/YAML-friendly data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
