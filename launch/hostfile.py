"""Hostfiles (DeepSpeed/MPI style) and the ``--include``/``--exclude``/``--num-nodes`` selection.

One host per line::

    # comments and blank lines are fine
    worker-0 slots=4
    worker-1 slots=4 addr=10.0.0.2 ifname=eth1

``slots`` is the number of ranks on that host (Open MPI's ``max_slots`` is
accepted and ignored). Two optional keys cover what a multi-homed host needs:
``addr`` is the address the other hosts reach it at (torchrun's ``--local-addr``;
default: the host name) and ``ifname`` the interface its ranks talk over
(``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME`` on that host).

A selection is DeepSpeed's syntax: hosts separated by ``@``, optionally with
slot indices: ``worker-0:0,2@worker-1`` keeps slots 0 and 2 of worker-0 and all
of worker-1. Selected slots become ``CUDA_VISIBLE_DEVICES`` on that host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from distcomp.launch.errors import LaunchConfigError

_NAME = re.compile(r"^[A-Za-z0-9_.:\[\]-]+$")
_KEYS = ("slots", "max_slots", "addr", "ifname")


@dataclass(frozen=True)
class Host:
    """One host of the job and the ranks it runs."""

    name: str
    """How ssh/pdsh/MPI reach it."""
    slots: int
    """Ranks on this host (torchrun's ``--nproc-per-node``)."""
    addr: str | None = None
    """Address the other hosts reach it at (``--local-addr``); ``None``: the name."""
    ifname: str | None = None
    """Interface its ranks talk over (``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME``); ``None``: unset."""
    devices: tuple[int, ...] | None = None
    """Slot indices kept by ``--include``/``--exclude`` (``CUDA_VISIBLE_DEVICES``); ``None``: all of them."""

    @property
    def address(self) -> str:
        """The address other hosts connect to."""
        return self.addr or self.name


def parse_hostfile(path: str | Path) -> list[Host]:
    """The hosts of a hostfile, in file order; :class:`LaunchConfigError` names the file and line of a mistake."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise LaunchConfigError(f"hostfile {path}: cannot read it ({exc.strerror or exc})") from None
    hosts: dict[str, Host] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        host = _parse_line(line, f"hostfile {path}, line {number}")
        if host.name in hosts:
            raise LaunchConfigError(f"hostfile {path}, line {number}: host {host.name!r} is listed twice")
        hosts[host.name] = host
    if not hosts:
        raise LaunchConfigError(f"hostfile {path}: no hosts in it (expected lines like 'worker-0 slots=4')")
    return list(hosts.values())


def _parse_line(line: str, where: str) -> Host:
    name, *fields = line.split()
    if not _NAME.match(name) or "=" in name:
        raise LaunchConfigError(f"{where}: {line!r} does not start with a host name (expected 'HOST slots=N')")
    values: dict[str, str] = {}
    for field in fields:
        key, sep, value = field.partition("=")
        if not sep or not value:
            raise LaunchConfigError(f"{where}: {field!r} is not KEY=VALUE (expected 'HOST slots=N')")
        if key not in _KEYS:
            raise LaunchConfigError(f"{where}: unknown key {key!r} (known: {', '.join(_KEYS)})")
        values[key] = value
    if "slots" not in values:
        raise LaunchConfigError(f"{where}: host {name!r} has no slots=N")
    if not values["slots"].isdigit() or int(values["slots"]) < 1:
        raise LaunchConfigError(f"{where}: slots={values['slots']!r} must be a whole number >= 1")
    return Host(name, int(values["slots"]), values.get("addr"), values.get("ifname"))


def select_hosts(hosts: list[Host], *, include: str = "", exclude: str = "", num_nodes: int | None = None,
                 nproc_per_node: int | None = None) -> list[Host]:
    """Apply ``--include`` or ``--exclude``, then ``--num-nodes`` (the first N), then ``--nproc-per-node``."""
    if include and exclude:
        raise LaunchConfigError("--include and --exclude cannot be used together")
    if include:
        hosts = _include(hosts, _parse_selection(include, hosts, "--include"))
    elif exclude:
        hosts = _exclude(hosts, _parse_selection(exclude, hosts, "--exclude"))
    if num_nodes is not None:
        if num_nodes < 1 or num_nodes > len(hosts):
            raise LaunchConfigError(f"--num-nodes {num_nodes}: {len(hosts)} host(s) available after selection")
        hosts = hosts[:num_nodes]
    if nproc_per_node is not None:
        hosts = [_first_slots(h, nproc_per_node) for h in hosts]
    if not hosts:
        raise LaunchConfigError("no host left after --include/--exclude")
    return hosts


def _parse_selection(text: str, hosts: list[Host], flag: str) -> dict[str, tuple[int, ...] | None]:
    known = {h.name: h for h in hosts}
    chosen: dict[str, tuple[int, ...] | None] = {}
    for part in text.split("@"):
        name, sep, slots = part.strip().partition(":")
        if name not in known:
            raise LaunchConfigError(f"{flag} {text!r}: host {name!r} is not in the hostfile "
                                    f"(hosts: {', '.join(known)})")
        if not sep:
            chosen[name] = None
            continue
        try:
            picked = tuple(sorted({int(s) for s in slots.split(",")}))
        except ValueError:
            raise LaunchConfigError(f"{flag} {text!r}: {part!r} must be HOST or HOST:SLOT,SLOT,...") from None
        bad = [s for s in picked if not 0 <= s < known[name].slots]
        if bad:
            raise LaunchConfigError(f"{flag} {text!r}: {name} has slots 0..{known[name].slots - 1}, not {bad}")
        chosen[name] = picked
    return chosen


def _include(hosts: list[Host], chosen: dict[str, tuple[int, ...] | None]) -> list[Host]:
    out = []
    for h in hosts:
        if h.name in chosen:
            slots = chosen[h.name]
            out.append(h if slots is None else replace(h, slots=len(slots), devices=slots))
    return out


def _exclude(hosts: list[Host], chosen: dict[str, tuple[int, ...] | None]) -> list[Host]:
    out = []
    for h in hosts:
        if h.name not in chosen:
            out.append(h)
        elif chosen[h.name] is not None:
            kept = tuple(s for s in range(h.slots) if s not in chosen[h.name])
            if kept:
                out.append(replace(h, slots=len(kept), devices=kept))
    return out


def _first_slots(host: Host, n: int) -> Host:
    if n < 1 or n > host.slots:
        raise LaunchConfigError(f"--nproc-per-node {n}: host {host.name} has {host.slots} slot(s)")
    if n == host.slots:
        return host
    devices = (host.devices or tuple(range(host.slots)))[:n]
    return replace(host, slots=n, devices=devices)
