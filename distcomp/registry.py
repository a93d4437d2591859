"""Compressors register themselves by name; configs are built from plain dicts.

A compressor class carries a nested ``Config`` dataclass. Building a config from
user input goes through :func:`build_config`, which rejects unknown keys with a
message that names the key and the allowed ones, before the dataclass's own
``__post_init__`` validates the values.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from distcomp.errors import ConfigError
from distcomp.validation import check_types

if TYPE_CHECKING:
    from distcomp.compressor import Compressor

_COMPRESSORS: dict[str, type[Compressor]] = {}
C = TypeVar("C", bound="type[Compressor]")


def register_compressor(name: str) -> Callable[[C], C]:
    """Class decorator: make a compressor reachable by ``name`` from configs and ``register``."""

    def wrap(cls: C) -> C:
        if name in _COMPRESSORS:
            raise ValueError(f"compressor {name!r} is registered twice")
        cls.name = name
        _COMPRESSORS[name] = cls
        return cls

    return wrap


def available_compressors() -> list[str]:
    """Names of every registered compressor, sorted."""
    return sorted(_COMPRESSORS)


def get_compressor(name: str) -> type[Compressor]:
    """The compressor class registered as ``name``; a clear error if there is none."""
    try:
        return _COMPRESSORS[name]
    except KeyError:
        raise ConfigError(
            f"unknown compressor {name!r}{_did_you_mean(name, _COMPRESSORS)}; "
            f"available: {', '.join(available_compressors())}"
        ) from None


def compressor_for_config(config: Any) -> type[Compressor]:
    """The compressor whose nested ``Config`` is ``type(config)``."""
    for cls in _COMPRESSORS.values():
        if type(config) is cls.Config:
            return cls
    raise ConfigError(f"{type(config).__qualname__} is not the Config of a registered compressor")


def build_config(name: str, values: dict[str, Any]) -> Any:
    """``get_compressor(name).Config(**values)``, with unknown keys named before construction."""
    cls = get_compressor(name)
    allowed = {f.name for f in dataclasses.fields(cls.Config) if f.init}
    for key in values:
        if key not in allowed:
            raise ConfigError(
                f"unknown key {key!r} for compressor {name!r}{_did_you_mean(key, allowed)}; "
                f"allowed keys: {', '.join(sorted(allowed)) or '(none)'}"
            )
    check_types(cls.Config, values, where=f"compressor {name!r}")
    return cls.Config(**values)


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
