"""Make an MPI rank a torch.distributed rank, then run the program.

    mpiexec -n 4 python -m distcomp.launch.mpi_bootstrap train.py --lr 0.1
    mpiexec -n 4 python -m distcomp.launch.mpi_bootstrap -m distcomp train CONFIG

:func:`bootstrap_from_mpi` sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT, so that ``init_process_group(init_method="env://")``
(and ``distcomp train``, which joins any job with RANK and WORLD_SIZE set) works
under MPI. With mpi4py the ranks come from ``MPI.COMM_WORLD`` and rank 0
broadcasts the master address and port (MASTER_ADDR/MASTER_PORT from its own
environment when set, else its host's address and a free port). Without mpi4py
(or with ``DISTCOMP_MPI4PY=0``) they come from the variables MPICH (``PMI_*``,
``MPI_LOCAL*``) and Open MPI (``OMPI_COMM_WORLD_*``) give each rank, and
MASTER_ADDR/MASTER_PORT must already be set (``distcomp launch`` passes them).
The torch backend is gloo or NCCL: torch wheels have no MPI backend.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import runpy
import socket
import sys
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass

from distcomp.launch.errors import LaunchError

logger = logging.getLogger("distcomp.launch")
DEFAULT_PORT = 29500


@dataclass(frozen=True)
class RankEnv:
    """Who this rank is and where rank 0 listens."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str
    """Where it came from: ``"mpi4py"``, ``"mpich"`` (PMI variables) or ``"openmpi"``."""

    def as_env(self) -> dict[str, str]:
        """The torch.distributed variables."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


_VARIABLES = {  # source: (rank, size, local rank, local size)
    "openmpi": (
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    "mpich": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
}


def rank_env_from_variables(environ: MutableMapping[str, str] | dict[str, str]) -> RankEnv:
    """The rank from the variables the MPI launcher set; :class:`LaunchError` when there are none."""
    for source, (rank, size, local_rank, local_size) in _VARIABLES.items():
        if rank in environ and size in environ:
            r, n = int(environ[rank]), int(environ[size])
            local_n = int(environ.get(local_size, n))
            if "MASTER_ADDR" not in environ and local_n != n:
                raise LaunchError(
                    f"rank {r}: MASTER_ADDR is not set and the job spans several hosts "
                    "(install mpi4py, or pass MASTER_ADDR to every rank)"
                )
            return RankEnv(
                r,
                n,
                int(environ.get(local_rank, r)),
                local_n,
                environ.get("MASTER_ADDR", "127.0.0.1"),
                int(environ.get("MASTER_PORT", DEFAULT_PORT)),
                source,
            )
    raise LaunchError(
        "no MPI rank variables (PMI_RANK/PMI_SIZE or OMPI_COMM_WORLD_RANK/SIZE): start this under mpiexec/mpirun"
    )


def rank_env_from_mpi4py(environ: MutableMapping[str, str] | dict[str, str]) -> RankEnv:
    """The rank from ``MPI.COMM_WORLD``; rank 0 broadcasts the master address and port."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    master = None
    if world.Get_rank() == 0:
        master = (environ.get("MASTER_ADDR") or _own_address(), int(environ.get("MASTER_PORT") or _free_port()))
    addr, port = world.bcast(master, root=0)
    rank_env = RankEnv(world.Get_rank(), world.Get_size(), node.Get_rank(), node.Get_size(), addr, port, "mpi4py")
    node.Free()
    return rank_env


def _own_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi4py_wanted(environ: MutableMapping[str, str]) -> bool:
    if environ.get("DISTCOMP_MPI4PY", "1") == "0":
        return False
    # Only whether it is there: importing mpi4py.MPI would initialise MPI.
    return importlib.util.find_spec("mpi4py") is not None


def bootstrap_from_mpi(environ: MutableMapping[str, str] | None = None) -> RankEnv:
    """Set RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT in ``environ``.

    ``environ`` defaults to ``os.environ``.
    """
    environ = os.environ if environ is None else environ
    found = rank_env_from_mpi4py(environ) if _mpi4py_wanted(environ) else rank_env_from_variables(environ)
    environ.update(found.as_env())
    logger.debug(
        "MPI rank %d/%d (local %d/%d) from %s, master %s:%d",
        found.rank,
        found.world_size,
        found.local_rank,
        found.local_world_size,
        found.source,
        found.master_addr,
        found.master_port,
    )
    return found


def run_program(argv: Sequence[str]) -> None:
    """Run ``SCRIPT args``, ``-m MODULE args`` or ``--no-python EXE args`` in this rank."""
    if not argv:
        raise LaunchError("mpi_bootstrap: no program given (SCRIPT, -m MODULE or --no-python EXECUTABLE)")
    if argv[0] == "-m" and len(argv) > 1:
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "--no-python" and len(argv) > 1:
        if "mpi4py.MPI" in sys.modules:  # the executable replaces this process: leave MPI cleanly first
            sys.modules["mpi4py.MPI"].Finalize()
        os.execvp(argv[1], list(argv[1:]))
    else:
        sys.argv = list(argv)
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m distcomp.launch.mpi_bootstrap PROGRAM...``: bootstrap, then run the program in this process."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        bootstrap_from_mpi()
    except LaunchError as exc:
        sys.stderr.write(f"distcomp launch: error: {exc}\n")
        return 3
    run_program(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
