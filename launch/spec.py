"""What a launch is made of: the program, the job and the commands that start it (all frozen)."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from distcomp.launch.errors import LaunchConfigError
from distcomp.launch.hostfile import Host

_PYTHONS = ("python", "python3")


@dataclass(frozen=True)
class Program:
    """What each rank runs: a Python script, a module (``-m``) or any executable."""

    kind: Literal["script", "module", "exec"]
    target: str
    args: tuple[str, ...] = ()

    @classmethod
    def from_argv(cls, argv: Sequence[str], *, module: bool = False, no_python: bool = False) -> Program:
        """Read ``SCRIPT args``; ``distcomp ...`` and ``python X.py ...`` mean what they say."""
        argv = list(argv)
        if argv and argv[0] == "--":
            argv = argv[1:]
        if not argv:
            raise LaunchConfigError("no program to launch: give a SCRIPT (or -m MODULE) and its arguments")
        if module:
            return cls("module", argv[0], tuple(argv[1:]))
        if no_python:
            return cls("exec", argv[0], tuple(argv[1:]))
        if argv[0] in _PYTHONS and len(argv) > 1:
            if argv[1] == "-m" and len(argv) > 2:
                return cls("module", argv[2], tuple(argv[3:]))
            return cls("script", argv[1], tuple(argv[2:]))
        if argv[0] == "distcomp":
            # The console script may not be on the remote PATH; the module is wherever distcomp is installed.
            return cls("module", "distcomp", tuple(argv[1:]))
        if argv[0].endswith(".py"):
            return cls("script", argv[0], tuple(argv[1:]))
        return cls("exec", argv[0], tuple(argv[1:]))

    def torchrun_args(self) -> list[str]:
        """The tail of a torchrun command line that runs this program."""
        head = {"script": [], "module": ["-m"], "exec": ["--no-python"]}[self.kind]
        return [*head, self.target, *self.args]

    def bootstrap_args(self) -> list[str]:
        """The same program as arguments of :mod:`distcomp.launch.mpi_bootstrap`."""
        return self.torchrun_args()


@dataclass(frozen=True)
class Job:
    """Everything every launcher mode needs to build its commands."""

    hosts: tuple[Host, ...]
    program: Program
    python: str
    """The Python interpreter on every host (the launcher's own by default: same path everywhere)."""
    master_addr: str
    master_port: int
    rdzv_id: str
    cwd: str
    """Working directory on every host."""
    env: tuple[tuple[str, str], ...] = ()
    """Variables for every host (see :mod:`distcomp.launch.environment`)."""
    max_restarts: int = 0
    nnodes: str | None = None
    """``MIN:MAX`` for an elastic job; ``None``: exactly ``len(hosts)``."""
    stop_timeout_s: float = 30.0
    """Seconds a node gets to stop (``--stop-timeout``) before it is killed, by the launcher or its watchdog."""

    @property
    def world_size(self) -> int:
        """Ranks in the job when every host is up."""
        return sum(h.slots for h in self.hosts)

    @property
    def elastic(self) -> bool:
        """True when torch's agent may go on with fewer nodes than were started."""
        if self.nnodes is None:
            return False
        low, _, high = self.nnodes.partition(":")
        return low != (high or low)


@dataclass(frozen=True)
class Command:
    """One process the launcher starts on this machine (``label``: the host it stands for, or the launcher)."""

    label: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = field(default=())
    """Variables for this local process on top of the launcher's environment."""
    lifeline: bool = False
    """Its stdin is a pipe the launcher holds open and never writes (the watchdog stops the node at EOF)."""

    def shell(self) -> str:
        """The command as one shell line (what ``--dry-run`` prints)."""
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env)
        return f"{prefix} {shlex.join(self.argv)}" if prefix else shlex.join(self.argv)
