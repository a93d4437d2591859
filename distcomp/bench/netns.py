"""Hosts on one machine: network namespaces on a Linux bridge, each host's egress capped by ``tc tbf``.

    with hosts_on_bridge(4, "100mbit") as net:
        subprocess.run(net.exec_argv(0, ["python", "worker.py"]))

Each host is a namespace with one veth end (address ``<subnet>.<i+1>``/24) and
its loopback; the other end of each pair sits on a bridge inside a namespace of
its own (the switch), so deleting the namespaces deletes everything, bridge
included. A token-bucket filter caps each host's egress at the given rate
(``None``: unshaped). This kernel has no ``netem``, so latency and loss cannot
be emulated, only bandwidth. The namespaces are removed on every way out of the
``with`` block (errors, ``KeyboardInterrupt``, and SIGTERM/SIGHUP inside
:func:`signals_raise`); namespaces left by a run that was killed outright are
removed by the next run (:func:`remove_stale`: the creating pid is in every
name). Needs root and iproute2 (installed with apt-get if missing, by
:func:`ensure_tools`).

:func:`shaped_link` is the two-host case the 2-rank benchmarks use, and
:func:`run_ranks` runs a rank function on each of its ends.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("distcomp.bench.netns")

PREFIX = "dcbench"
"""Name prefix of every namespace this module creates: ``dcbench-<pid>-<i>`` and ``dcbench-<pid>-sw``."""
_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
LOOPBACK_NAMES = ("none", "loopback", "unshaped")
"""Entries of a benchmark's ``--bandwidth`` list that mean no shaping."""
SLOW_LINK_BITS = 50e6
"""Links slower than this (bits/s) leave out the methods that send dense gradients by default: one of
their steps takes tens of seconds on the wire (43.6 MB at 10 Mbit/s is 35 s)."""
SSH_STANDIN = """\
#!/bin/sh
# ssh stand-in [-o OPT | -p PORT]... HOST COMMAND... runs COMMAND inside the network namespace HOST.
while [ $# -gt 0 ]; do
  case "$1" in
    -o|-p|-i|-l) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
host=$1; shift
exec ip netns exec "$host" sh -c "$*"
"""
"""What the launcher's ``ssh`` does on a real host, for hosts that are namespaces on this machine."""
MAX_HOSTS = 250
"""Hosts of one bridge: addresses ``.1`` to ``.250`` of a /24."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived inside :func:`signals_raise` (a BaseException, like KeyboardInterrupt, so that
    ``except Exception`` does not swallow it on the way to the cleanup)."""


@contextmanager
def signals_raise() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into :class:`Terminated` in the main thread, so ``finally`` blocks run."""

    def raise_terminated(signum: int, _frame: Any) -> None:
        raise Terminated(f"stopped by {signal.Signals(signum).name}")

    previous = {s: signal.signal(s, raise_terminated) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def parse_links(bandwidth: str | None) -> list[str | None]:
    """The links of a comma-separated ``--bandwidth`` list, in order; None stands for unshaped (also the
    whole list's default)."""
    names = [b.strip() for b in (bandwidth or "").split(",") if b.strip()]
    return [None if b.lower() in LOOPBACK_NAMES else b for b in names] or [None]


def link_name(bandwidth: str | None) -> str:
    """How tables and result files name a link."""
    return "unshaped" if bandwidth is None else bandwidth


@dataclass(frozen=True)
class Host:
    """One host: a namespace and its end of a veth pair."""

    namespace: str
    iface: str
    """The veth end inside the namespace (what ``GLOO_SOCKET_IFNAME`` should name)."""
    address: str


@dataclass(frozen=True)
class Network:
    """Hosts on one bridge, each host's egress shaped to ``rate``."""

    hosts: tuple[Host, ...]
    rate: str | None
    """tc rate of each host's egress, e.g. ``"100mbit"``; None: unshaped."""
    switch: str
    """The namespace holding the bridge."""

    def exec_argv(self, index: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside host ``index``'s namespace."""
        return ["ip", "netns", "exec", self.hosts[index].namespace, *argv]

    def tx_bytes(self, index: int) -> int:
        """Bytes host ``index`` has sent on its veth end (the kernel's interface counter)."""
        host = self.hosts[index]
        out = _sh("ip", "netns", "exec", host.namespace, "cat", f"/sys/class/net/{host.iface}/statistics/tx_bytes")
        return int(out.strip())

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


Link = Network
"""The two-host network of :func:`shaped_link`."""


def install_ssh_standin(folder: Path) -> Path:
    """Write :data:`SSH_STANDIN` as ``folder/ssh`` (put ``folder`` first on the launcher's PATH); its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ssh"
    path.write_text(SSH_STANDIN)
    path.chmod(0o755)
    return path


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


def cannot_create_reason() -> str | None:
    """Why namespaces cannot be made here (None when they can), in words that name the fix."""
    if os.geteuid() != 0:
        return "network namespaces and tc need root: run as root (e.g. sudo), or in a container with CAP_NET_ADMIN"
    if not (shutil.which("ip") and shutil.which("tc")) and not shutil.which("apt-get"):
        return "`ip` and `tc` (iproute2) are missing and apt-get is not there to install them: install iproute2"
    return None


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


def namespaces(pid: int | None = None) -> list[str]:
    """Namespaces of this module (of the process ``pid`` only, when given)."""
    names = re.findall(rf"^({PREFIX}-(\d+)-\w+)\b", _sh("ip", "netns", "list"), flags=re.MULTILINE)
    return [name for name, owner in names if pid is None or int(owner) == pid]


def remove_stale() -> None:
    """Delete namespaces of this module whose creating process is gone (a run killed with SIGKILL)."""
    for name in namespaces():
        owner = int(name.split("-")[1])
        if not _alive(owner):
            logger.info("removing stale namespace %s", name)
            _kill_inside(name)
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def tbf_args(rate: str) -> list[str]:
    """tbf settings: a bucket of 10 ms at the rate (at least 32 KiB), a queue of at most 50 ms."""
    burst = max(int(rate_bits(rate) / 8 / 100), 32 * 1024)
    return ["tbf", "rate", rate, "burst", str(burst), "latency", "50ms"]


def _create(net: Network) -> None:
    sw = net.switch
    _sh("ip", "netns", "add", sw)
    _sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
    _sh("ip", "-n", sw, "link", "set", "br0", "up")
    for i, host in enumerate(net.hosts):
        port = f"p{i}"
        _sh("ip", "netns", "add", host.namespace)
        _sh("ip", "link", "add", host.iface, "netns", host.namespace, "type", "veth", "peer", "name", port, "netns", sw)
        _sh("ip", "-n", sw, "link", "set", port, "master", "br0")
        _sh("ip", "-n", sw, "link", "set", port, "up")
        _sh("ip", "-n", host.namespace, "link", "set", "lo", "up")
        _sh("ip", "-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.iface)
        _sh("ip", "-n", host.namespace, "link", "set", host.iface, "up")
        if net.rate is not None:
            _sh("tc", "-n", host.namespace, "qdisc", "add", "dev", host.iface, "root", *tbf_args(net.rate))


def _kill_inside(namespace: str) -> None:
    """Kill what still runs in ``namespace``: a namespace outlives its deletion while a process holds it."""
    proc = subprocess.run(["ip", "netns", "pids", namespace], check=False, capture_output=True, text=True)
    for pid in proc.stdout.split():
        with suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _delete(net: Network) -> None:
    # Deleting a namespace deletes the veth ends inside it, and with them the pairs and the bridge ports.
    for name in [h.namespace for h in net.hosts] + [net.switch]:
        _kill_inside(name)
        proc = subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, text=True)
        if proc.returncode != 0 and "No such file" not in proc.stderr:
            logger.warning("could not delete namespace %s: %s", name, proc.stderr.strip())


@contextmanager
def hosts_on_bridge(n: int, rate: str | None, subnet: str = "10.77.0") -> Iterator[Network]:
    """``n`` fresh namespaces on one bridge, each host's egress capped at ``rate`` (None: unshaped); removed
    on exit."""
    if not 2 <= n <= MAX_HOSTS:
        raise ValueError(f"hosts must be 2 to {MAX_HOSTS}, got {n}")
    if rate is not None:
        rate_bits(rate)  # a bad rate fails here, before anything is created
    ensure_tools()
    remove_stale()
    pid = os.getpid()
    hosts = tuple(Host(f"{PREFIX}-{pid}-{i}", f"dcb{pid}h{i}", f"{subnet}.{i + 1}") for i in range(n))
    net = Network(hosts, rate, f"{PREFIX}-{pid}-sw")
    try:
        _create(net)
        logger.info("%d hosts on a bridge, %s", n, f"{rate} egress each" if rate else "unshaped")
        yield net
    finally:
        _delete(net)


@contextmanager
def shaped_link(rate: str, subnet: str = "10.77.0") -> Iterator[Network]:
    """Two hosts whose link is capped at ``rate`` each way; removed on exit."""
    with hosts_on_bridge(2, rate, subnet) as net:
        yield net


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
