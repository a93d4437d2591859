"""Compression configs: YAML presets and validation helpers for the nested ``Config`` dataclasses.

A compression config looks like::

    version: 1
    compressor: powersgd
    rank: 4
    start_step: 2

either as a whole file or as the ``compression:`` section of a training config
(which carries ``version`` at its top). It is read with ``yaml.safe_load`` (no
tags, no interpolation, no evaluation); every key other than ``version`` and
``compressor`` is a field of the compressor's ``Config``, checked by
:func:`distcomp.schema.build` like every other config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distcomp.errors import ConfigError
from distcomp.registry import build_config, compressor_for_config
from distcomp.validation import read_yaml_mapping

if TYPE_CHECKING:
    from distcomp.compressor import CompressorConfig

__all__ = ["config_digest", "config_from_dict", "config_to_dict", "load_config"]

CONFIG_VERSION = 1


def load_config(path: str | Path) -> CompressorConfig:
    """Read a compression config (YAML file, or a training config's ``compression`` section) into its ``Config``."""
    path = Path(path)
    raw = read_yaml_mapping(path, "compression config", "'version' and 'compressor' keys")
    if "compression" in raw:
        check_version(raw.get("version"), str(path))
        return compression_section(raw["compression"], str(path))
    if "compressor" not in raw and "optimizer" in raw:
        raise ConfigError(
            f"{path}: a training config without a 'compression' section (its optimizer communicates "
            f"by itself): run it with `distcomp train {path}`; there is no compressor to load"
        )
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: Mapping[str, Any], source: str = "config") -> CompressorConfig:
    """Build a compressor ``Config`` from ``{"version": 1, "compressor": name, **fields}``."""
    values = dict(raw)
    check_version(values.pop("version", None), source)
    return _compressor_config(values, source, section="")


def compression_section(section: Any, source: str) -> CompressorConfig:
    """The ``compression:`` section of a training config (``compressor:`` and its options) as a ``Config``.

    Messages name its keys ``compression.<key>`` and start with ``source`` (the file).
    """
    if not isinstance(section, Mapping):
        raise ConfigError(f"{source}: 'compression' must be a mapping with a 'compressor' key")
    return _compressor_config(dict(section), source, section="compression")


def check_version(version: Any, source: str) -> None:
    """Raise a :class:`ConfigError` unless ``version`` (a config's top-level ``version``) is this format's."""
    if version != CONFIG_VERSION:
        raise ConfigError(
            f"{source}: 'version' must be {CONFIG_VERSION} (got {version!r}); "
            f"add 'version: {CONFIG_VERSION}' at the top"
        )


def _compressor_config(values: dict[str, Any], source: str, section: str) -> CompressorConfig:
    name = values.pop("compressor", None)
    if not isinstance(name, str):
        key = f"{section}.compressor" if section else "compressor"
        raise ConfigError(f"{source}: missing {key!r} (the name of a registered compressor)")
    try:
        return build_config(name, values, section=section)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def config_to_dict(config: CompressorConfig) -> dict[str, Any]:
    """The inverse of :func:`config_from_dict`: plain values only, safe for YAML and checkpoints."""
    return {
        "version": CONFIG_VERSION,
        "compressor": compressor_for_config(config).name,
        **dataclasses.asdict(config),
    }


def config_digest(config: CompressorConfig, **extra: Any) -> str:
    """A stable hash of a config (plus ``extra`` settings), equal on ranks that agree."""
    blob = json.dumps({**config_to_dict(config), **extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
