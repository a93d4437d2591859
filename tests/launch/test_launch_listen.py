"""``distcomp launch`` binds what it listens on: loopback on one node, each host's ``addr=`` across hosts.

torch's c10d TCPStore listens on every interface without authentication. The
jobs here run for real; while both ranks are up, every listening TCP socket of
their processes (found through ``/proc``, in each process's network namespace)
must be bound to 127.0.0.1 on a single node, and to the host's own address
across two hosts (network namespaces reached through the ssh stand-in).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from launch_jobs import Launcher, job_processes, kill_all, write_job
from launch_netns import NetHost, install_ssh_standin, write_hostfile

pytestmark = pytest.mark.slow  # every test launches a job

ROOT = Path(__file__).resolve().parents[2]
LISTEN = "0A"
"""TCP state LISTEN in /proc/net/tcp*."""


def listening_sockets(pid: int) -> dict[str, str]:
    """``socket inode -> "address:port"`` of every listening TCP socket in the network namespace of ``pid``."""
    out: dict[str, str] = {}
    for table, width in ((f"/proc/{pid}/net/tcp", 8), (f"/proc/{pid}/net/tcp6", 32)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue  # it exited
        for row in rows:
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


def job_listeners(argv: list[str], env: dict[str, str], job: Path) -> dict[str, str]:
    """Run the job until both ranks are up; ``"address:port" -> host`` of each socket its processes listen on."""
    launcher = Launcher(argv, env, ROOT)
    try:
        launcher.wait_for_output(["READY rank=0", "READY rank=1", "step=2"], timeout=120)
        ours: dict[str, str] = {}
        for pid in job_processes(job.name):
            listening = listening_sockets(pid)
            host = Path(f"/proc/{pid}/environ").read_bytes().split(b"DISTCOMP_LAUNCH_HOST=")[-1].split(b"\0")[0]
            ours.update({listening[i]: host.decode() for i in sockets_of(pid) if i in listening})
        return ours
    finally:
        launcher.close()
        kill_all(job.name)


def launch_argv(*options: str) -> list[str]:
    return [sys.executable, "-m", "distcomp", "launch", "--stop-timeout", "5", *options]


@pytest.mark.parametrize("restarts", ["0", "1"], ids=["fixed", "max-restarts"])
def test_a_single_node_job_listens_on_loopback_only(tmp_path: Path, restarts: str) -> None:
    job = write_job(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ours = job_listeners(launch_argv("--nproc-per-node", "2", "--max-restarts", restarts, str(job), "100000"),
                         env, job)
    # The rendezvous store, the agent's store for its workers, and each rank's gloo listener.
    assert len(ours) >= 4, ours
    exposed = sorted(s for s in ours if not s.startswith("127.0.0.1:"))
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_a_two_host_job_listens_on_each_hosts_address_only(tmp_path: Path, hosts: tuple[NetHost, NetHost]) -> None:
    standin = install_ssh_standin(tmp_path / "bin").parent
    job = write_job(tmp_path)
    env = {**os.environ, "PATH": f"{standin}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    hostfile = write_hostfile(tmp_path / "hosts", hosts)
    ours = job_listeners(launch_argv("--hostfile", str(hostfile), "--launcher", "ssh", str(job), "100000"), env, job)
    addr = {h.name: h.addr for h in hosts}
    assert len(ours) >= 4, ours
    assert f"{hosts[0].addr}:" in " ".join(ours)  # the rendezvous store, on the first host
    exposed = sorted(f"{s} on {host}" for s, host in ours.items() if not s.startswith(f"{addr[host]}:"))
    assert not exposed, f"listening beyond the host's address: {exposed}"
