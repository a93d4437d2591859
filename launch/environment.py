"""The environment every node's agent gets: forwarded variables, ``.distcomp_env`` and ``--env``.

Later sources win: variables forwarded from the launcher's own environment
(:data:`FORWARD_PREFIXES`, :data:`FORWARD_NAMES`), then the environment file,
then ``--env KEY=VAL``. A host's ``ifname=`` in the hostfile sets that host's
socket interfaces on top of all of them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from distcomp.launch.errors import LaunchConfigError
from distcomp.launch.hostfile import read_utf8

ENV_FILE = ".distcomp_env"
"""Looked up in the working directory, then the home directory (the first one found is read)."""
FORWARD_PREFIXES = ("NCCL_", "GLOO_", "TORCH_NCCL_", "FI_", "UCX_")
"""Variables with these prefixes follow the job to every host (interfaces, transports, debugging)."""
FORWARD_NAMES = ("PYTHONPATH", "OMP_NUM_THREADS", "CUDA_DEVICE_ORDER")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_assignment(text: str, where: str) -> tuple[str, str]:
    """``KEY=VALUE`` into ``(KEY, VALUE)``; :class:`LaunchConfigError` naming ``where`` otherwise."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if key.startswith("export "):
        key = key[len("export ") :].strip()
    if not sep or not _KEY.match(key):
        raise LaunchConfigError(f"{where}: {text!r} is not KEY=VALUE")
    if "\0" in value:
        raise LaunchConfigError(f"{where}: the value of {key} contains a NUL byte (no process can be given it)")
    return key, value


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments, blank lines and a leading ``export`` allowed), verbatim values."""
    out: dict[str, str] = {}
    lines = read_utf8(path, "environment file").splitlines()
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            key, value = parse_assignment(line, f"environment file {path}, line {number}")
            out[key] = value
    return out


def default_env_file(cwd: Path) -> Path | None:
    """``.distcomp_env`` in ``cwd``, else in the home directory, else ``None``."""
    for folder in (cwd, Path.home()):
        if (folder / ENV_FILE).is_file():
            return folder / ENV_FILE
    return None


def forwarded(environ: Mapping[str, str]) -> dict[str, str]:
    """The launcher's own variables that every host should see."""
    return {k: v for k, v in sorted(environ.items()) if k.startswith(FORWARD_PREFIXES) or k in FORWARD_NAMES}


def job_env(environ: Mapping[str, str], env_file: Path | None, assignments: Sequence[str]) -> dict[str, str]:
    """The variables every node's agent gets (see the module docstring for the order)."""
    out = forwarded(environ)
    if env_file is not None:
        out.update(read_env_file(env_file))
    for text in assignments:
        key, value = parse_assignment(text, "--env")
        out[key] = value
    return out


def socket_env(ifname: str) -> dict[str, str]:
    """The variables that make gloo and NCCL talk over interface ``ifname``."""
    return {"GLOO_SOCKET_IFNAME": ifname, "NCCL_SOCKET_IFNAME": ifname}


def current_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment with ``extra`` on top (for a local child)."""
    return {**os.environ, **extra}
