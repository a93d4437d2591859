"""Exceptions distcomp raises on bad input. Each message names the problem and the fix."""

from __future__ import annotations


class DistcompError(Exception):
    """Base class of every error distcomp raises on purpose."""


class ConfigError(DistcompError, ValueError):
    """A configuration key or value is wrong (unknown key, bad value, bad YAML)."""


class RankMismatchError(DistcompError, RuntimeError):
    """Ranks disagree on something that must be identical on every rank."""


class CheckpointError(DistcompError, RuntimeError):
    """A state dict cannot be loaded into this state (wrong shape, world size, rank or config)."""
