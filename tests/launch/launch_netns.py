"""Two "hosts" on this machine for launcher tests: network namespaces joined by a veth pair, and an ssh stand-in.

The stand-in is a tiny ``ssh`` put first on PATH: ``ssh [-o OPT]... HOST CMD``
runs ``CMD`` with ``sh -c`` inside the network namespace named HOST, which is
what the launcher's real ssh does on a real host. Namespaces are removed on
every way out of :func:`two_hosts`, and ones left by a killed run are removed
by the next (their creating pid is in the name).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from distcomp.bench.netns import install_ssh_standin

PREFIX = "dclaunch"
SUBNET = "10.78.0"


@dataclass(frozen=True)
class NetHost:
    """One namespace: its name (the host name the launcher uses), veth end and address."""

    name: str
    iface: str
    addr: str


def _sh(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")


def cannot_create_reason() -> str | None:
    """Why namespaces cannot be made here (``None`` when they can)."""
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed (.ci/run installs it)"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return f"`ip netns add` is not permitted here: {proc.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


def _remove_stale() -> None:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    for match in re.finditer(rf"^({PREFIX}-(\d+)-\d+)", listing, re.M):
        if not Path(f"/proc/{match.group(2)}").exists():
            subprocess.run(["ip", "netns", "del", match.group(1)], capture_output=True, timeout=30)


@contextmanager
def two_hosts() -> Iterator[tuple[NetHost, NetHost]]:
    """Two namespaces joined by a veth pair (``10.78.0.1`` and ``.2``); removed on exit."""
    _remove_stale()
    pid = os.getpid()
    hosts = (NetHost(f"{PREFIX}-{pid}-0", f"dcl{pid}a", f"{SUBNET}.1"),
             NetHost(f"{PREFIX}-{pid}-1", f"dcl{pid}b", f"{SUBNET}.2"))
    try:
        for h in hosts:
            _sh("ip", "netns", "add", h.name)
        _sh("ip", "link", "add", hosts[0].iface, "netns", hosts[0].name,
            "type", "veth", "peer", "name", hosts[1].iface, "netns", hosts[1].name)
        for h in hosts:
            _sh("ip", "-n", h.name, "link", "set", "lo", "up")
            _sh("ip", "-n", h.name, "addr", "add", f"{h.addr}/24", "dev", h.iface)
            _sh("ip", "-n", h.name, "link", "set", h.iface, "up")
        yield hosts
    finally:
        for h in hosts:
            subprocess.run(["ip", "netns", "del", h.name], capture_output=True, timeout=30)


def write_hostfile(path: Path, hosts: tuple[NetHost, ...], slots: int = 1) -> Path:
    """A hostfile naming each namespace with its address and interface."""
    lines = ["# two network namespaces on this machine"]
    lines += [f"{h.name} slots={slots} addr={h.addr} ifname={h.iface}" for h in hosts]
    path.write_text("\n".join(lines) + "\n")
    return path
