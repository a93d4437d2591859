"""``distcomp launch`` on one node: torchrun here, a busy port, a rank that dies."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distcomp import cli

pytestmark = pytest.mark.slow  # every test launches a job

ROOT = Path(__file__).resolve().parents[2]
ALLREDUCE = str(Path(__file__).with_name("launch_allreduce.py"))


def launch(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distcomp", "launch", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})


def test_one_node_runs_torchrun_with_n_ranks(tmp_path: Path) -> None:
    out = launch("--nproc-per-node", "2", ALLREDUCE, str(tmp_path))
    assert out.returncode == 0, out.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["RANK"] for r in ranks] == ["0", "1"] and all(r["sum"] == 3.0 for r in ranks)
    assert all(r["LOCAL_WORLD_SIZE"] == "2" for r in ranks)


def test_a_rank_that_dies_fails_the_job_with_the_nodes_exit_code(tmp_path: Path) -> None:
    script = tmp_path / "die.py"
    script.write_text("import os, sys, time\n"
                      "if os.environ['RANK'] == '1':\n    sys.exit(7)\n"
                      "time.sleep(300)\n")  # rank 0 would wait forever: torchrun must stop it
    start = time.monotonic()
    out = launch("--nproc-per-node", "2", str(script))
    assert time.monotonic() - start < 60
    assert out.returncode == 10, out.stderr
    assert "node 0 (localhost) failed first (exit code 1); launcher exit code 10" in out.stderr


def test_a_busy_port_on_this_machine_is_a_clear_error(capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["launch", "--nproc-per-node", "1", "--master-port", str(port), "train.py"]) == 3
    err = capsys.readouterr().err
    assert f"port {port} is already in use on this machine" in err and "--master-port" in err
