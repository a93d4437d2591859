"""Checks before any rank starts: every host answers, has Python with torch and distcomp, the master port is free.

One short command per host (in parallel, each with a timeout) doubles as the
ssh check and, on the rendezvous host, as the port check: it binds the given
port (a clear error when something already listens there) or picks a free one.
"""

from __future__ import annotations

import errno
import shlex
import socket
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from distcomp.launch.errors import LaunchError
from distcomp.launch.spec import Job

PROBE_TIMEOUT_S = 60.0
_PROBE = """\
import importlib.util, socket, sys
if importlib.util.find_spec("torch") is None:
    sys.exit(f"torch is not importable by {sys.executable}")
if importlib.util.find_spec("distcomp") is None:
    sys.exit(f"distcomp is not importable by {sys.executable} (each node runs python -m distcomp.launch.watchdog): "
             "install it there")
port = int(sys.argv[1])
if port >= 0:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("", port))
    except OSError as exc:
        sys.exit(f"port {port} is already in use ({exc.strerror})")
    print("port", s.getsockname()[1])
"""

RemoteArgv = Callable[[str, str], list[str]]
"""``(host, shell line) -> argv`` that runs the line on the host (ssh or pdsh)."""


def port_in_use_message(where: str, port: int) -> str:
    return (
        f"port {port} is already in use on {where}: give another --master-port, "
        "or leave it out and a free one is picked"
    )


def local_port(port: int | None) -> int:
    """``port`` after checking it is free on this machine, or a free port when ``None``."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port or 0))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise LaunchError(port_in_use_message("this machine", port or 0)) from None
            raise LaunchError(f"cannot bind port {port} here: {exc.strerror}") from None
        return s.getsockname()[1]


def probe_hosts(job: Job, remote: RemoteArgv, port: int | None) -> int:
    """Check every host of ``job``; the master port (``port``, or a free one found on host 0)."""

    def probe(index: int) -> str:
        host = job.hosts[index]
        check_port = (port or 0) if index == 0 else -1
        # From the job's directory, as the node command runs: a distcomp found only there counts.
        line = f"cd {shlex.quote(job.cwd)} && {shlex.join([job.python, '-c', _PROBE, str(check_port)])}"
        argv = remote(host.name, line)
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            raise LaunchError(
                f"host {host.name} did not answer within {PROBE_TIMEOUT_S:g} s: `{shlex.join(argv[:-1])} ...`"
            ) from None
        except FileNotFoundError:
            raise LaunchError(f"`{argv[0]}` is not installed here (needed to reach host {host.name})") from None
        if proc.returncode != 0:
            detail = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
            if "already in use" in detail:
                raise LaunchError(port_in_use_message(f"host {host.name}", port or 0))
            raise LaunchError(
                f"ssh check of host {host.name} failed (exit code {proc.returncode}): {detail}\n"
                f"  command: {shlex.join(argv[:-1])} '<check: {job.python} imports torch and distcomp"
                f"{', port ' + str(port) + ' is free' if index == 0 and port else ''}>'"
            )
        return proc.stdout

    with ThreadPoolExecutor(max_workers=min(32, len(job.hosts))) as pool:
        outputs = list(pool.map(probe, range(len(job.hosts))))
    words = outputs[0].split()
    if "port" not in words or words.index("port") + 1 >= len(words):
        raise LaunchError(f"ssh check of host {job.hosts[0].name}: unexpected answer {outputs[0]!r}")
    return int(words[words.index("port") + 1])
