"""MPI: ``distcomp launch --launcher mpich`` and ``mpi_bootstrap`` start real ranks through ``mpiexec``.

MPICH and mpi4py come from pip (``pip install mpich mpi4py``: wheels; ``mpiexec``
lands next to Python). torch wheels have no MPI backend, so MPI only
bootstraps the ranks and torch.distributed runs on gloo.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_train import QUICKSTART, TINY, sets

pytestmark = pytest.mark.slow  # every test runs mpiexec or the launcher

ROOT = Path(__file__).resolve().parents[2]
ALLREDUCE = str(Path(__file__).with_name("launch_allreduce.py"))
BIN = Path(sys.executable).parent
MPIEXEC = shutil.which("mpiexec", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")

needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="MPICH is not installed (pip install mpich mpi4py)")


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(MPIEXEC or sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def reports(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def launch(*args: str, timeout: float = 90, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distcomp", "launch", *args], capture_output=True, text=True,
                          timeout=timeout, env=env(**extra), cwd=ROOT)


@needs_mpi
@pytest.mark.parametrize("bootstrap", ["mpi4py", "variables"])
def test_two_ranks_through_mpiexec_bootstrap_torch_distributed_and_all_reduce(tmp_path: Path,
                                                                               bootstrap: str) -> None:
    if bootstrap == "mpi4py":
        pytest.importorskip("mpi4py")
    choice = ["--env", "DISTCOMP_MPI4PY=0"] if bootstrap == "variables" else []
    out = launch("--launcher", "mpich", "--nproc-per-node", "2", *choice, ALLREDUCE, str(tmp_path))
    assert out.returncode == 0, out.stderr
    a, b = reports(tmp_path)
    assert [a["RANK"], b["RANK"]] == ["0", "1"] and a["WORLD_SIZE"] == b["WORLD_SIZE"] == "2"
    assert [a["LOCAL_RANK"], b["LOCAL_RANK"]] == ["0", "1"]
    assert a["MASTER_PORT"] == b["MASTER_PORT"] and a["MASTER_ADDR"] == b["MASTER_ADDR"] == "127.0.0.1"
    assert a["sum"] == b["sum"] == 3.0
    assert a["mpi4py"] is (bootstrap == "mpi4py")


@needs_mpi
def test_plain_mpiexec_with_mpi4py_gets_master_address_and_port_from_rank_0(tmp_path: Path) -> None:
    pytest.importorskip("mpi4py")
    argv = [MPIEXEC, "-n", "2", sys.executable, "-m", "distcomp.launch.mpi_bootstrap", ALLREDUCE, str(tmp_path)]
    clean = {k: v for k, v in env(GLOO_SOCKET_IFNAME="lo").items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run(argv, capture_output=True, text=True, timeout=90, env=clean, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    a, b = reports(tmp_path)
    assert a["MASTER_ADDR"] == b["MASTER_ADDR"] and a["MASTER_PORT"] == b["MASTER_PORT"]  # rank 0's, broadcast
    assert a["sum"] == b["sum"] == 3.0 and a["mpi4py"] and b["mpi4py"]


@needs_mpi
def test_distcomp_train_runs_under_mpiexec(tmp_path: Path) -> None:
    words = sets({**TINY, "steps": 3, "compare": "[]", "dist.nproc": 5, "log.dir": tmp_path})
    out = launch("--launcher", "mpich", "--nproc-per-node", "2", "--", "distcomp", "train", QUICKSTART, "--quiet",
                 *words, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "2 ranks (gloo, cpu)" in out.stdout  # mpiexec's 2 ranks joined one job, not dist.nproc's 5
    assert out.stdout.count("final val loss") == 1


def test_a_missing_mpiexec_is_a_clear_error(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "distcomp", "launch", "--launcher", "mpich", "--nproc-per-node", "2",
                          ALLREDUCE, str(tmp_path)], capture_output=True, text=True, timeout=50, cwd=ROOT,
                         env={**os.environ, "PATH": str(tmp_path), "PYTHONPATH": str(ROOT)})
    assert out.returncode == 3
    assert "--launcher mpich: `mpiexec` is not on PATH" in out.stderr and "Traceback" not in out.stderr
    assert not list(tmp_path.glob("rank*.json"))


def test_openmpi_mode_refuses_an_mpirun_of_another_mpi(tmp_path: Path) -> None:
    mpirun = shutil.which("mpirun", path=env()["PATH"])
    if mpirun is None:
        pytest.skip("no mpirun here")
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
    if "Open MPI" in version.stdout + version.stderr:
        pytest.skip("mpirun here is Open MPI's")
    out = launch("--launcher", "openmpi", "--nproc-per-node", "2", ALLREDUCE, str(tmp_path), timeout=50)
    assert out.returncode == 3
    assert "is not Open MPI's mpirun" in out.stderr and "use --launcher mpich" in out.stderr
