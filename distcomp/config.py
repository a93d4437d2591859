"""Compression configs: YAML presets and validation helpers for the nested ``Config`` dataclasses.

A compression config looks like::

    version: 1
    compressor: powersgd
    rank: 4
    start_step: 2

either as a whole file or as the ``compression:`` section of a training config
(which carries ``version`` at its top). It is read with ``yaml.safe_load`` (no
tags, no interpolation, no evaluation); every key other than ``version`` and
``compressor`` is a field of the compressor's ``Config``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from distcomp.errors import ConfigError
from distcomp.registry import build_config, compressor_for_config
from distcomp.validation import read_text_file

__all__ = ["config_digest", "config_from_dict", "config_to_dict", "load_config"]

CONFIG_VERSION = 1


def load_config(path: str | Path) -> Any:
    """Read a compression config (YAML file, or a training config's ``compression`` section) into its ``Config``."""
    path = Path(path)
    try:
        raw = yaml.safe_load(read_text_file(path, "compression config"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with 'version' and 'compressor' keys")
    if "compression" in raw:
        section = raw["compression"]
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: 'compression' must be a mapping with a 'compressor' key")
        return config_from_dict({"version": raw.get("version"), **section}, source=f"{path}: compression")
    if "compressor" not in raw and "optimizer" in raw:
        raise ConfigError(f"{path}: a training config without a 'compression' section (its optimizer communicates "
                          f"by itself): run it with `distcomp train {path}`; there is no compressor to load")
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Any:
    """Build a compressor ``Config`` from ``{"version": 1, "compressor": name, **fields}``."""
    values = dict(raw)
    version = values.pop("version", None)
    if version != CONFIG_VERSION:
        raise ConfigError(f"{source}: 'version' must be {CONFIG_VERSION} (got {version!r}); add 'version: 1'")
    name = values.pop("compressor", None)
    if not isinstance(name, str):
        raise ConfigError(f"{source}: missing 'compressor' (the name of a registered compressor)")
    try:
        return build_config(name, values)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """The inverse of :func:`config_from_dict`: plain values only, safe for YAML and checkpoints."""
    return {
        "version": CONFIG_VERSION,
        "compressor": compressor_for_config(config).name,
        **dataclasses.asdict(config),
    }


def config_digest(config: Any, **extra: Any) -> str:
    """A stable hash of a config (plus ``extra`` settings), equal on ranks that agree."""
    blob = json.dumps({**config_to_dict(config), **extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
