"""Which implementation the public ops run: Triton kernels or the pure-torch reference.

The public ops run the Triton kernels on CUDA tensors when ``triton`` imports,
and the reference (``*_ref``) everywhere else. ``DISTCOMP_KERNELS`` overrides
the choice, read at every call:

* ``auto`` (default): Triton on CUDA, the reference elsewhere;
* ``reference``: always the reference (to rule the kernels out when debugging);
* ``triton``: Triton wherever it can run, which includes CPU tensors when
  ``TRITON_INTERPRET=1`` was set before the kernels were first imported (slow:
  for tests only).

Triton itself is imported only here, lazily, so ``import distcomp`` works on
machines without it.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Literal

import torch

logger = logging.getLogger(__name__)

Backend = Literal["triton", "reference"]
MODES = ("auto", "reference", "triton")
ENV = "DISTCOMP_KERNELS"


def _mode() -> str:
    """``DISTCOMP_KERNELS``, validated."""
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: expected one of {', '.join(MODES)}")
    return mode


@functools.cache
def triton_status() -> tuple[str | None, str]:
    """``(version, "")`` if Triton imports, else ``(None, why not)``; tried once per process."""
    try:
        import triton
    except ImportError as exc:
        return None, f"triton is not installed ({exc.name or exc}); pip install 'distcomp[triton]'"
    except Exception as exc:  # noqa: BLE001 - a broken install must not break `import distcomp`
        logger.warning("triton failed to import, using the reference kernels: %s", exc)
        return None, f"triton failed to import: {type(exc).__name__}: {exc}"
    return triton.__version__, ""


def interpreting() -> bool:
    """True when Triton kernels are defined for the interpreter (``TRITON_INTERPRET=1``, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def backend_reason(device: torch.device | str) -> tuple[Backend, str]:
    """The backend the public ops use for tensors on ``device``, with a short reason."""
    device = torch.device(device)
    mode = _mode()
    if mode == "reference":
        return "reference", f"{ENV}=reference"
    version, why_not = triton_status()
    if version is None:
        return "reference", why_not
    if device.type == "cuda":
        return "triton", f"triton {version} on CUDA"
    if mode == "triton" and device.type == "cpu" and interpreting():
        return "triton", f"triton {version} interpreter on CPU ({ENV}=triton, TRITON_INTERPRET=1)"
    return "reference", f"no Triton kernels for {device.type} tensors"


def backend(device: torch.device | str) -> Backend:
    """``"triton"`` or ``"reference"``: what the public ops run for tensors on ``device``."""
    return backend_reason(device)[0]


def use_triton(t: torch.Tensor) -> bool:
    """Whether a public op given ``t`` dispatches to its Triton launcher."""
    if t.device.type == "cpu" and _mode() != "triton":
        return False  # the common CPU case, decided without touching triton
    return backend(t.device) == "triton"


def kernel_info() -> dict[str, str]:
    """What ``distcomp info`` prints about the kernels: the backend per device and why, and the ops."""
    from distcomp import kernels

    version, why_not = triton_status()
    info = {"triton": version if version is not None else f"unavailable ({why_not})"}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        name, reason = backend_reason(dev)
        info[dev] = f"{name} ({reason})"
    info["ops"] = ", ".join(sorted(n for n in kernels.__all__ if not n.endswith("_ref") and n not in _NOT_OPS))
    return info


_NOT_OPS = {"backend", "backend_reason", "kernel_info"}
