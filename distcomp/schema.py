"""One builder for every config: plain values (parsed YAML, keyword arguments) into frozen ``Config`` dataclasses.

:func:`build` checks what a dataclass would accept silently and what it would
reject with a bare ``TypeError``: keys it does not have (with the closest one and
the allowed ones), values whose type does not match the annotation (YAML's
``"no"`` is a truthy string, ``4.5`` is not a rank), numbers no run can use
(infinite, NaN) and strings with NUL bytes. Every message names the dotted key
(``optimizer.onebit_adam.freeze_step``) and what would be accepted. Then the
dataclass is constructed, and its ``__post_init__`` checks the values; those
errors keep their own message, prefixed with the section they come from.

Conversions are the ones a YAML file needs: ints are accepted for floats, a
number in exponent form without a dot (``1e-3``, which PyYAML reads as a
string) for a float, and lists for tuples.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar, Union

from distcomp.errors import ConfigError
from distcomp.validation import value_problem

__all__ = ["build", "check_keys", "did_you_mean"]

T = TypeVar("T")

# YAML 1.1 (PyYAML) wants a dot and a signed exponent in a float; YAML 1.2 and users do not.
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class _Mismatch(Exception):
    """A value does not have the annotated type; the caller names the key and the type."""


def build(cls: type[T], values: Any, *, section: str = "", where: str | None = None, base: T | None = None) -> T:
    """``cls(**values)`` (or ``dataclasses.replace(base, **values)``), with every key and value checked first.

    ``section`` is the dotted name of these values in a larger config (``""`` at its
    top), so messages name ``section.key``; ``where`` says in the unknown-key
    message which config this is (default: the section). A value for a field whose
    type is a dataclass is built the same way when it is a mapping, after the
    other keys, starting from what the config holds without it: the field's
    default, or ``config.section_base(key)`` where the class defines that (a
    section whose defaults come from its parent's values).
    """
    values = _as_mapping(values, section)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    check_keys(values, fields, section, where or (f"in section {section!r}" if section else "at the top level"))
    if base is None:
        _check_required(values, fields, section)
    hints = typing.get_type_hints(cls)
    nested = {k: v for k, v in values.items() if isinstance(v, Mapping) and _section_type(hints[k]) is not None}
    plain = {k: _coerce(v, hints[k], _dotted(section, k)) for k, v in values.items() if k not in nested}
    config = _construct(cls, plain, section, base)
    if not nested:
        return config
    built = {k: _build_section(config, k, v, hints[k], _dotted(section, k)) for k, v in nested.items()}
    return _construct(cls, built, section, config)


def check_keys(values: Iterable[Any], allowed: Iterable[str], section: str, where: str) -> None:
    """Raise a :class:`ConfigError` for the first key of ``values`` not in ``allowed``: the closest and all allowed."""
    allowed = sorted(allowed)
    for key in values:
        if key not in allowed:
            raise ConfigError(
                f"unknown key {_dotted(section, key)!r} {where}{did_you_mean(str(key), allowed)}; "
                f"allowed keys: {', '.join(allowed) or '(none)'}"
            )


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to ``word``, or ``""`` when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _dotted(section: str, key: Any) -> str:
    return f"{section}.{key}" if section else str(key)


def _as_mapping(values: Any, section: str) -> Mapping[str, Any]:
    if not isinstance(values, Mapping):
        if section:
            raise ConfigError(f"config key {section!r}: must be a mapping (a section), got {values!r}")
        raise ConfigError(f"expected a mapping of keys to values, got {values!r}")
    return values


def _check_required(values: Mapping[str, Any], fields: dict[str, dataclasses.Field[Any]], section: str) -> None:
    for name, f in fields.items():
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key {_dotted(section, name)!r} is required; add it")


def _construct(cls: type[T], kwargs: dict[str, Any], section: str, base: T | None) -> T:
    """The dataclass; its own checks' errors name the section they come from."""
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)  # type: ignore[type-var]
    except ConfigError as exc:
        if section:
            raise ConfigError(f"in section {section!r}: {exc}") from None
        raise


def _build_section(config: Any, key: str, values: Mapping[str, Any], hint: Any, dotted: str) -> Any:
    derive = getattr(config, "section_base", None)
    start = derive(key) if callable(derive) else getattr(config, key)
    return build(_section_type(hint), values, section=dotted, base=start)  # type: ignore[arg-type]


def _section_type(hint: Any) -> type | None:
    """The dataclass a field holds (``X`` of ``X`` or ``X | None``), or None."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = inner[0] if len(inner) == 1 else None
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


# -- values ------------------------------------------------------------------------


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as the annotation ``hint`` wants it; a :class:`ConfigError` naming ``key`` if it cannot be."""
    try:
        value = _convert(value, hint, key)
    except _Mismatch:
        raise ConfigError(f"config key {key!r}: must be {_describe(hint)}, got {value!r}") from None
    problem = value_problem(value)
    if problem is not None:
        raise ConfigError(f"config key {key!r}: {problem}")
    return value


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return _union(value, args, key)
    if origin is Literal:
        return _require(value, value in args)
    if hint is tuple or origin is tuple:
        return _tuple(value, args, key)
    if hint is dict or origin is dict:
        return dict(_require(value, isinstance(value, Mapping)))
    if dataclasses.is_dataclass(hint):
        if isinstance(value, Mapping):
            return build(hint, value, section=key)  # type: ignore[arg-type]
        return _require(value, isinstance(value, hint))  # type: ignore[arg-type]
    return _scalar(value, hint)


def _union(value: Any, args: tuple[Any, ...], key: str) -> Any:
    for arg in args:
        try:
            return _convert(value, arg, key)
        except _Mismatch:
            continue
    raise _Mismatch


def _tuple(value: Any, args: tuple[Any, ...], key: str) -> tuple[Any, ...]:
    _require(value, isinstance(value, (list, tuple)))
    if not args or (len(args) == 2 and args[1] is Ellipsis):
        return tuple(_coerce(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"config key {key!r}: must be a list of {len(args)} values, got {value!r}")
    return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


def _scalar(value: Any, hint: Any) -> Any:
    if hint is type(None):
        return _require(value, value is None)
    if hint is bool:
        return _require(value, isinstance(value, bool))
    if hint is int:
        return _require(value, isinstance(value, int) and not isinstance(value, bool))
    if hint is float:
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
            return float(value)
        return float(_require(value, isinstance(value, (int, float)) and not isinstance(value, bool)))
    if hint is str:
        return _require(value, isinstance(value, str))
    return value


def _require(value: Any, ok: bool) -> Any:
    if not ok:
        raise _Mismatch
    return value


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if hint is tuple or origin is tuple:
        fixed = args and not (len(args) == 2 and args[1] is Ellipsis)
        return f"a list of {len(args)} values" if fixed else "a list"
    if dataclasses.is_dataclass(hint):
        return "a mapping (a section)"
    names = {
        type(None): "null",
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        dict: "a mapping",
    }
    return names.get(hint, "a mapping" if origin is dict else getattr(hint, "__name__", str(hint)))
