"""Multi-node launch (installed as ``distcomp.launch``): ``distcomp launch`` and the MPI bootstrap.

* :mod:`~distcomp.launch.cli`: the ``distcomp launch`` options and the choice of mode.
* :mod:`~distcomp.launch.hostfile`, :mod:`~distcomp.launch.environment`: what the user gives.
* :mod:`~distcomp.launch.spec`: the frozen job and command descriptions every mode builds on.
* :mod:`~distcomp.launch.torchrun`, :mod:`~distcomp.launch.runners`, :mod:`~distcomp.launch.mpi`,
  :mod:`~distcomp.launch.slurm`: the exact commands of each mode.
* :mod:`~distcomp.launch.preflight`, :mod:`~distcomp.launch.supervise`: checks before, and the watch during, a run.
* :mod:`~distcomp.launch.mpi_bootstrap`: turns an MPI rank into a torch.distributed rank.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distcomp.launch.mpi_bootstrap import RankEnv

__all__ = ["bootstrap_from_mpi"]


def bootstrap_from_mpi(environ: MutableMapping[str, str] | None = None) -> RankEnv:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT from MPI.

    Call it in each rank started by ``mpirun``/``mpiexec`` before
    ``init_process_group(init_method="env://")``; see :mod:`distcomp.launch.mpi_bootstrap`.
    """
    # Imported here so that `python -m distcomp.launch.mpi_bootstrap` does not find the module pre-imported.
    from distcomp.launch.mpi_bootstrap import bootstrap_from_mpi as bootstrap

    return bootstrap(environ)
