"""Hostfiles (DeepSpeed/MPI style) and the ``--include``/``--exclude``/``--num-nodes`` selection.

One host per line::

    # comments and blank lines are fine
    worker-0 slots=4
    worker-1 slots=4 addr=10.0.0.2 ifname=eth1

``slots`` is the number of ranks on that host, 1 to :data:`MAX_SLOTS` (Open
MPI's ``max_slots`` is accepted and ignored). A host name must be a valid host
name (RFC 1123: dot-separated labels of letters, digits and inner ``-``) or an
IPv4/IPv6 address: it ends up on ssh's command line, where a name starting
with ``-`` would be read as an option. Two optional keys cover what a multi-homed host needs:
``addr`` is the address the other hosts reach it at (torchrun's ``--local-addr``;
default: the host name) and ``ifname`` the interface its ranks talk over
(``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME`` on that host).

A selection is DeepSpeed's syntax: hosts separated by ``@``, optionally with
slot indices: ``worker-0:0,2@worker-1`` keeps slots 0 and 2 of worker-0 and all
of worker-1. Selected slots become ``CUDA_VISIBLE_DEVICES`` on that host.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from distcomp.launch.errors import LaunchConfigError

_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_KEYS = ("slots", "max_slots", "addr", "ifname")
MAX_SLOTS = 4096
"""Most ranks on one host: each rank is a process with its own device and memory; more is a typo, not a machine."""
IFNAME_MAX = 15
"""Linux interface names are at most 15 characters (IFNAMSIZ - 1)."""


def is_host_name(text: str) -> bool:
    """True for an RFC 1123 host name or an IPv4/IPv6 address (``[...]`` around IPv6 allowed)."""
    try:
        ipaddress.ip_address(text[1:-1] if text.startswith("[") and text.endswith("]") else text)
        return True
    except ValueError:
        pass
    name = text[:-1] if text.endswith(".") else text
    labels = name.split(".")
    # An all-digit last label would be a mistyped IPv4 address (10.0.0.300), never a top-level domain.
    return 0 < len(name) <= 253 and all(_LABEL.match(label) for label in labels) and not labels[-1].isdigit()


def host_name_problem(text: str) -> str | None:
    """Why ``text`` is not a host name or address, or ``None`` when it is one."""
    if "\0" in text:
        return "contains a NUL byte"
    if text.startswith("-"):
        return "starts with '-' (ssh would read it as an option)"
    if not is_host_name(text):
        return (
            "is not a host name (letters, digits, '-' inside dot-separated labels of at most 63 characters) "
            "nor an IPv4/IPv6 address"
        )
    return None


def ifname_problem(text: str) -> str | None:
    """Why ``text`` is not a network interface name, or ``None`` when it is one."""
    if text.startswith("-") or "/" in text or "\0" in text or text in (".", ".."):
        return "an interface name has no '/' or NUL and does not start with '-'"
    if len(text) > IFNAME_MAX or any(c.isspace() for c in text):
        return f"an interface name has at most {IFNAME_MAX} characters and no spaces"
    return None


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
    text = read_utf8(path, "hostfile")
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


def read_utf8(path: Path, what: str) -> str:
    """The text of ``path``.

    Raises :class:`LaunchConfigError` naming ``what``, the file and the line when it cannot be read.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LaunchConfigError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise LaunchConfigError(
            f"{what} {path}, line {line}: byte 0x{data[exc.start]:02x} is not UTF-8 (save the file as UTF-8)"
        ) from None


def _parse_line(line: str, where: str) -> Host:
    name, *fields = line.split()
    if "=" in name:
        raise LaunchConfigError(f"{where}: {line!r} does not start with a host name (expected 'HOST slots=N')")
    problem = host_name_problem(name)
    if problem:
        raise LaunchConfigError(f"{where}: host {name!r} {problem}")
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
    if not values["slots"].isdigit() or not 1 <= int(values["slots"]) <= MAX_SLOTS:
        raise LaunchConfigError(
            f"{where}: slots={values['slots']!r} must be a whole number from 1 to {MAX_SLOTS} "
            "(ranks on this host: one process each)"
        )
    _check_value(values, "addr", host_name_problem, where)
    _check_value(values, "ifname", ifname_problem, where)
    return Host(name, int(values["slots"]), values.get("addr"), values.get("ifname"))


def _check_value(values: dict[str, str], key: str, problem_of: Callable[[str], str | None], where: str) -> None:
    problem = problem_of(values[key]) if key in values else None
    if problem:
        raise LaunchConfigError(f"{where}: {key}={values[key]!r}: {problem}")


def select_hosts(
    hosts: list[Host],
    *,
    include: str = "",
    exclude: str = "",
    num_nodes: int | None = None,
    nproc_per_node: int | None = None,
) -> list[Host]:
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
            raise LaunchConfigError(
                f"{flag} {text!r}: host {name!r} is not in the hostfile (hosts: {', '.join(known)})"
            )
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
        elif (dropped := chosen[h.name]) is not None:
            kept = tuple(s for s in range(h.slots) if s not in dropped)
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
