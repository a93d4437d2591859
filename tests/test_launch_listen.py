"""A single-node ``distcomp launch`` listens on loopback only: no store or rank of the job is reachable from outside.

torch's c10d TCPStore listens on every interface without authentication. The
job here runs for real; while both ranks are up, every listening TCP socket of
its processes (found through ``/proc``) must be bound to 127.0.0.1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from launch_jobs import Launcher, job_processes, kill_all, write_job

ROOT = Path(__file__).resolve().parents[1]
LISTEN = "0A"
"""TCP state LISTEN in /proc/net/tcp*."""


def listening_sockets() -> dict[str, str]:
    """``socket inode -> "address:port"`` of every listening TCP socket in this network namespace."""
    out: dict[str, str] = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == LISTEN:
                addr, port = fields[1].split(":")
                out[fields[9]] = f"{_address(addr, width)}:{int(port, 16)}"
    return out


def _address(hex_addr: str, width: int) -> str:
    raw = bytes.fromhex(hex_addr)
    if width == 8:
        return ".".join(str(b) for b in raw[::-1])
    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]  # four little-endian 32-bit words
    return "[" + b"".join(words).hex(":", 2) + "]"


def sockets_of(pid: int) -> set[str]:
    """Socket inodes open in process ``pid``."""
    out = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                out.add(target[8:-1])
    except OSError:
        pass
    return out


@pytest.mark.timeout(150)
@pytest.mark.parametrize("restarts", ["0", "1"], ids=["fixed", "max-restarts"])
def test_a_single_node_job_listens_on_loopback_only(tmp_path: Path, restarts: str) -> None:
    job = write_job(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = Launcher([sys.executable, "-m", "distcomp", "launch", "--nproc-per-node", "2", "--max-restarts",
                         restarts, "--stop-timeout", "5", str(job), "100000"], env, ROOT)
    try:
        launcher.wait_for_output(["READY rank=0", "READY rank=1", "step=2"], timeout=120)
        listening = listening_sockets()
        ours = {listening[inode] + f" (pid {pid}: {cmd[:80]})"
                for pid, cmd in job_processes(job.name).items() for inode in sockets_of(pid) if inode in listening}
    finally:
        launcher.close()
        kill_all(job.name)
    # The rendezvous store, the agent's store for its workers, and each rank's gloo listener.
    assert len(ours) >= 4, ours
    exposed = sorted(s for s in ours if not s.startswith("127.0.0.1:"))
    assert not exposed, f"listening beyond loopback: {exposed}"
