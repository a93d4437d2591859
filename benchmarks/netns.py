"""Two "hosts" on one machine: network namespaces joined by a veth pair, bandwidth capped by ``tc tbf``.

    with shaped_link("100mbit") as link:
        subprocess.run(link.exec_argv(0, ["python", "worker.py"]))

Each namespace holds one end of the pair (addresses ``<subnet>.1`` and
``<subnet>.2``, /24) and its loopback; a token-bucket filter on both ends caps
each direction at the given rate. This kernel has no ``netem``, so latency and
loss cannot be emulated, only bandwidth. The namespaces are removed on every
way out of the ``with`` block (errors and ``KeyboardInterrupt`` included);
namespaces left by a run that was killed outright are removed by the next run
(:func:`remove_stale`). Needs root and iproute2 (installed with apt-get if
missing, by :func:`ensure_tools`).
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("distcomp.bench.netns")

PREFIX = "dcbench"
"""Name prefix of every namespace this module creates: ``dcbench-<pid>-<i>``."""
_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
LOOPBACK_NAMES = ("none", "loopback", "unshaped")
"""Entries of a benchmark's ``--bandwidth`` list that mean loopback: no namespaces, no shaping."""
SLOW_LINK_BITS = 50e6
"""Links slower than this (bits/s) leave out the methods that send dense gradients by default: one of
their steps takes tens of seconds on the wire (43.6 MB at 10 Mbit/s is 35 s)."""


def parse_links(bandwidth: str | None) -> list[str | None]:
    """The links of a comma-separated ``--bandwidth`` list, in order; None stands for loopback (also the
    whole list's default)."""
    names = [b.strip() for b in (bandwidth or "").split(",") if b.strip()]
    return [None if b.lower() in LOOPBACK_NAMES else b for b in names] or [None]


def link_name(bandwidth: str | None) -> str:
    """How tables and result files name a link."""
    return "unshaped" if bandwidth is None else bandwidth


@dataclass(frozen=True)
class Host:
    """One end of the link."""

    namespace: str
    iface: str
    """The veth end inside the namespace (what ``GLOO_SOCKET_IFNAME`` should name)."""
    address: str


@dataclass(frozen=True)
class Link:
    """Two namespaces joined by a shaped veth pair."""

    hosts: tuple[Host, Host]
    rate: str
    """tc rate of each direction, e.g. ``"100mbit"``."""

    def exec_argv(self, index: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside host ``index``'s namespace."""
        return ["ip", "netns", "exec", self.hosts[index].namespace, *argv]

    def run_workers(self, script: str, job: str, hosts: Sequence[int], timeout: float) -> None:
        """``python script --worker job --rank r`` for each rank r, inside host ``hosts[r]``; wait for all.

        Each rank's gloo binds to its host's veth end (``GLOO_SOCKET_IFNAME``).
        Raises as soon as one rank fails or the time is up; no rank outlives the call.
        """
        procs: list[subprocess.Popen] = []
        try:
            for rank, host in enumerate(hosts):
                argv = [sys.executable, script, "--worker", job, "--rank", str(rank)]
                env = {**os.environ, "GLOO_SOCKET_IFNAME": self.hosts[host].iface}
                procs.append(subprocess.Popen(self.exec_argv(host, argv), env=env))
            _wait_all(procs, timeout)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()


def _wait_all(procs: Sequence[subprocess.Popen], timeout: float) -> None:
    """Wait for every process; raise as soon as one fails or the time is up."""
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            raise RuntimeError(f"rank {failed[0][0]} exited with status {failed[0][1]}")
        if all(code == 0 for code in codes):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the ranks did not finish within {timeout:.0f}s")
        time.sleep(0.5)


def rate_bits(rate: str) -> float:
    """Bits per second of a tc rate such as ``"100mbit"`` or ``"1gbit"`` (decimal units, as tc reads them)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]+)\s*", rate.lower())
    if match is None or match.group(2) not in _UNITS:
        raise ValueError(f"bandwidth {rate!r} is not a tc rate like 100mbit or 1gbit (units: {', '.join(_UNITS)})")
    return float(match.group(1)) * _UNITS[match.group(2)]


def ensure_tools() -> None:
    """Install iproute2 (``ip``, ``tc``) with apt-get when either is missing."""
    if shutil.which("ip") and shutil.which("tc"):
        return
    logger.info("ip/tc not found: installing iproute2 with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "iproute2"], check=True, env=env)


def _sh(*argv: str) -> str:
    """Run a command; its stdout, or a RuntimeError that quotes its stderr."""
    proc = subprocess.run(argv, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> None:
    """Delete namespaces of this module whose creating process is gone (a run killed with SIGKILL)."""
    for line in _sh("ip", "netns", "list").splitlines():
        match = re.match(rf"({PREFIX}-(\d+)-\d+)\b", line)
        if match and not _alive(int(match.group(2))):
            logger.info("removing stale namespace %s", match.group(1))
            subprocess.run(["ip", "netns", "del", match.group(1)], check=False, capture_output=True)


def _tbf_args(rate: str) -> list[str]:
    """tbf settings: a bucket of 10 ms at the rate (at least 32 KiB), a queue of at most 50 ms."""
    burst = max(int(rate_bits(rate) / 8 / 100), 32 * 1024)
    return ["tbf", "rate", rate, "burst", str(burst), "latency", "50ms"]


def _create(hosts: tuple[Host, Host], rate: str) -> None:
    a, b = hosts
    for host in hosts:
        _sh("ip", "netns", "add", host.namespace)
    _sh(
        "ip",
        "link",
        "add",
        a.iface,
        "netns",
        a.namespace,
        "type",
        "veth",
        "peer",
        "name",
        b.iface,
        "netns",
        b.namespace,
    )
    for host in hosts:
        _sh("ip", "-n", host.namespace, "link", "set", "lo", "up")
        _sh("ip", "-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.iface)
        _sh("ip", "-n", host.namespace, "link", "set", host.iface, "up")
        _sh("tc", "-n", host.namespace, "qdisc", "add", "dev", host.iface, "root", *_tbf_args(rate))


def _delete(hosts: tuple[Host, Host]) -> None:
    # Deleting a namespace deletes the veth end inside it, and with it the pair.
    for host in hosts:
        proc = subprocess.run(["ip", "netns", "del", host.namespace], check=False, capture_output=True, text=True)
        if proc.returncode != 0 and "No such file" not in proc.stderr:
            logger.warning("could not delete namespace %s: %s", host.namespace, proc.stderr.strip())


@contextmanager
def shaped_link(rate: str, subnet: str = "10.77.0") -> Iterator[Link]:
    """Two fresh namespaces joined by a veth pair capped at ``rate`` each way; removed on exit."""
    rate_bits(rate)  # a bad rate fails here, before anything is created
    ensure_tools()
    remove_stale()
    pid = os.getpid()
    hosts = (
        Host(f"{PREFIX}-{pid}-0", f"dcb{pid}a", f"{subnet}.1"),
        Host(f"{PREFIX}-{pid}-1", f"dcb{pid}b", f"{subnet}.2"),
    )
    try:
        _create(hosts, rate)
        logger.info("link %s <-> %s at %s each way", hosts[0].address, hosts[1].address, rate)
        yield Link(hosts, rate)
    finally:
        _delete(hosts)


# -- a rank function on each end of a shaped link --------------------------------------------


def run_ranks(
    script: str,
    fn: Callable[..., Any],
    bandwidth: str,
    args: tuple[Any, ...] = (),
    *,
    port: int = 29631,
    timeout: float = 1800.0,
) -> list[Any]:
    """``fn(rank, 2, *args)`` on two gloo ranks, one per end of a link shaped to ``bandwidth``; their returns.

    The namespaced side of ``distcomp.testing.run_ranks``. ``script`` (the
    benchmark's own file) is started as ``script --worker JOB --rank R`` in each
    namespace and must hand those two to :func:`worker_main`; ``fn`` and ``args``
    travel pickled, so ``fn`` must be module-level in ``script``.
    """
    with shaped_link(bandwidth) as link, tempfile.TemporaryDirectory() as tmp:
        results = [str(Path(tmp) / f"rank{r}.pkl") for r in range(2)]
        job = Path(tmp) / "job.pkl"
        init = f"tcp://{link.hosts[0].address}:{port}"
        job.write_bytes(pickle.dumps({"fn": fn, "args": args, "init_method": init, "results": results}))
        link.run_workers(str(Path(script).resolve()), str(job), [0, 1], timeout)
        return [pickle.loads(Path(r).read_bytes()) for r in results]


def worker_main(job_path: str, rank: int) -> None:
    """One rank of :func:`run_ranks`, inside its namespace: join the group, run, write what ``fn`` returned."""
    import torch
    import torch.distributed as dist

    job = pickle.loads(Path(job_path).read_bytes())
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=job["init_method"], rank=rank, world_size=2, timeout=datetime.timedelta(seconds=600)
    )
    try:
        out = job["fn"](rank, 2, *job["args"])
        dist.barrier()  # exiting right after DDP can abort the process
    finally:
        dist.destroy_process_group()
    Path(job["results"][rank]).write_bytes(pickle.dumps(out))


def serve_worker(argv: Sequence[str] | None = None) -> bool:
    """Run :func:`worker_main` if ``argv`` (default: the command line) is ``--worker JOB --rank R``.

    A benchmark's ``main`` calls this first, so that :func:`run_ranks` can start its script as a rank.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 4 or argv[0] != "--worker" or argv[2] != "--rank":
        return False
    worker_main(argv[1], int(argv[3]))
    return True
