"""Compressors register themselves by name; configs are built from plain dicts.

A compressor class carries a nested ``Config`` dataclass (a
:class:`~distcomp.compressor.CompressorConfig`). Building one from user input
goes through :func:`build_config`, which hands it to the one config builder,
:func:`distcomp.schema.build`: unknown keys and wrong types are named before the
dataclass's own ``__post_init__`` validates the values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from distcomp.errors import ConfigError
from distcomp.schema import build, did_you_mean

if TYPE_CHECKING:
    from distcomp.compressor import Compressor, CompressorConfig

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
            f"unknown compressor {name!r}{did_you_mean(name, _COMPRESSORS)}; "
            f"available: {', '.join(available_compressors())}"
        ) from None


def compressor_for_config(config: CompressorConfig) -> type[Compressor]:
    """The compressor whose nested ``Config`` is ``type(config)``."""
    for cls in _COMPRESSORS.values():
        if type(config) is cls.Config:
            return cls
    raise ConfigError(f"{type(config).__qualname__} is not the Config of a registered compressor")


def build_config(name: str, values: Mapping[str, Any], *, section: str = "") -> CompressorConfig:
    """The ``Config`` of compressor ``name`` from plain values, checked by :func:`distcomp.schema.build`.

    ``section`` is where the values sit in a larger config (``"compression"`` in a
    training config), so that messages name ``compression.<key>``.
    """
    return build(get_compressor(name).Config, values, section=section, where=f"for compressor {name!r}")


def make_compressor(compressor: str | CompressorConfig, config: dict[str, Any]) -> Compressor:
    """A compressor from a registered name and its options, or from a ``Config`` (``config`` overrides its fields)."""
    if isinstance(compressor, str):
        return get_compressor(compressor)(build_config(compressor, config))
    cls = compressor_for_config(compressor)
    return cls(dataclasses.replace(compressor, **config) if config else compressor)
