"""``mpirun``/``mpiexec`` command lines for MPICH and Open MPI.

MPI starts every rank itself (no torchrun agent): each rank runs
:mod:`distcomp.launch.mpi_bootstrap`, which turns the MPI environment into
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT and then runs the program.
The master address and port are passed along as well, for ranks without mpi4py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

from distcomp.launch.errors import LaunchError
from distcomp.launch.spec import Command, Job

Flavor = Literal["mpich", "openmpi"]
EXECUTABLE: dict[str, str] = {"mpich": "mpiexec", "openmpi": "mpirun"}
BOOTSTRAP_MODULE = "distcomp.launch.mpi_bootstrap"
OMPI_ROOT_ENV = (("OMPI_ALLOW_RUN_AS_ROOT", "1"), ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"))
"""Open MPI refuses to run as root without both."""


def _rank_env(job: Job) -> list[tuple[str, str]]:
    return [*job.env, ("MASTER_ADDR", job.master_addr), ("MASTER_PORT", str(job.master_port))]


def _hosts_spec(job: Job) -> str:
    return ",".join(f"{h.name}:{h.slots}" for h in job.hosts)


def mpi_command(job: Job, flavor: Flavor, *, multi_host: bool, as_root: bool | None = None) -> Command:
    """The one command that starts every rank of the job through MPI."""
    argv = [EXECUTABLE[flavor], "-n", str(job.world_size)]
    if flavor == "mpich":
        if multi_host:
            argv += ["-hosts", _hosts_spec(job)]
        for key, value in _rank_env(job):
            argv += ["-genv", key, value]
    else:
        if multi_host:
            argv += ["--host", _hosts_spec(job)]
        for key, value in _rank_env(job):
            argv += ["-x", f"{key}={value}"]
    argv += [job.python, "-m", BOOTSTRAP_MODULE, *job.program.bootstrap_args()]
    root = (os.geteuid() == 0) if as_root is None else as_root
    env = OMPI_ROOT_ENV if flavor == "openmpi" and root else ()
    return Command("mpi", tuple(argv), env)


def check_mpi_executable(flavor: Flavor) -> str:
    """The path of the MPI launcher for ``flavor``; :class:`LaunchError` when it is missing or of another MPI."""
    name = EXECUTABLE[flavor]
    found = shutil.which(name)
    if found is None:
        hint = (
            "pip install mpich (puts mpiexec next to Python) or apt-get install mpich"
            if flavor == "mpich"
            else "apt-get install openmpi-bin"
        )
        beside = Path(sys.executable).parent / name
        if beside.exists():
            hint = f"{beside} exists: put {beside.parent} on PATH"
        raise LaunchError(f"--launcher {flavor}: `{name}` is not on PATH ({hint})")
    if flavor == "openmpi":
        out = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=30)
        if "Open MPI" not in out.stdout + out.stderr and "open-mpi" not in out.stdout + out.stderr:
            raise LaunchError(
                f"--launcher openmpi: {found} is not Open MPI's mpirun "
                f"({(out.stdout or out.stderr).strip().splitlines()[:1]}); use --launcher mpich"
            )
    return found
