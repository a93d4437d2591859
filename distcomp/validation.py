"""Validation helpers shared by every config dataclass: errors name the key and the fix."""

from __future__ import annotations

import math
import types
import typing
from pathlib import Path
from typing import Any

from distcomp.errors import ConfigError


def require(condition: bool, key: str, problem: str) -> None:
    """Raise a :class:`ConfigError` naming ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"config key {key!r}: {problem}")


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``; a :class:`ConfigError` naming ``what`` and the path if it cannot be read."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                          "save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def value_problem(value: Any) -> str | None:
    """What is wrong with a scalar that matches its type but no config can use, or None.

    Infinite and NaN numbers pass ``> 0`` style checks (``inf > 0``) and then fail
    deep inside a rank (a timeout of ``inf`` seconds, a learning rate of ``inf``
    that trains to NaN); a NUL byte in a string fails in the first file-system call.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    if isinstance(value, str) and "\0" in value:
        return f"must not contain a NUL byte, got {value!r}"
    return None


def check_types(cls: type, values: dict[str, Any], where: str = "") -> None:
    """Raise a :class:`ConfigError` naming the key whose value does not match ``cls``'s annotation.

    YAML gives strings, ints, floats and bools; a dataclass would accept any of
    them silently (``"no"`` is truthy), so types are checked before construction.
    """
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        hint = hints.get(key)
        place = f" in {where}" if where else ""
        if hint is not None and not _matches(value, hint):
            raise ConfigError(f"config key {key!r}{place}: expected {_describe(hint)}, got {value!r}")
        problem = value_problem(value)
        if problem is not None:
            raise ConfigError(f"config key {key!r}{place}: {problem}")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))
