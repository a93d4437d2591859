"""Errors of ``distcomp launch`` and its exit codes. Every message names the host, file or command at fault."""

from __future__ import annotations

from distcomp.errors import ConfigError, DistcompError

EXIT_USAGE = 2
"""Bad input: options, hostfile, environment file, ``--include``/``--exclude``."""
EXIT_PREFLIGHT = 3
"""A check before any rank started failed: ssh, a busy port, a missing ``mpirun``."""
EXIT_NODE_FAILED = 10
"""Node ``i`` failed first: the launcher exits with ``EXIT_NODE_FAILED + i`` (capped at 125)."""
EXIT_INTERRUPTED = 130


class LaunchError(DistcompError, RuntimeError):
    """The job cannot start here (a preflight check failed); exit code :data:`EXIT_PREFLIGHT`."""


class LaunchConfigError(ConfigError):
    """The launch options or files are wrong; exit code :data:`EXIT_USAGE`."""


def node_failed_code(index: int) -> int:
    """The launcher's exit code when node ``index`` (0-based, hostfile order) failed first."""
    return min(EXIT_NODE_FAILED + index, 125)
