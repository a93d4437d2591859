"""Validation helpers shared by every config: errors name the key (or the file) and the fix.

The builder that checks whole configs against their dataclasses is :mod:`distcomp.schema`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

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
        raise ConfigError(
            f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def read_yaml_mapping(path: Path, what: str, expected: str) -> dict[str, Any]:
    """The mapping a YAML file holds (read with ``yaml.safe_load``: no tags, no evaluation).

    Errors name the file; ``expected`` says what the mapping should have, e.g.
    ``"'version: 1' at its top"``.
    """
    try:
        raw = yaml.safe_load(read_text_file(path, what))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with {expected}")
    return raw


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
