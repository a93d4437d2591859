"""Build a distcomp optimizer from a DeepSpeed config, for users of DeepSpeed's removed 1-bit optimizers.

    opt = distcomp.optim.from_deepspeed_config("ds_config.json", model.parameters())

Only the ``optimizer`` section is read::

    "optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-4, "freeze_step": 23000, "cuda_aware": false,
                                                   "comm_backend_name": "nccl"}}

``type`` is matched without regard to case, as DeepSpeed does (``OneBitAdam``,
``OnebitAdam``, ``ZeroOneAdam``, ``OneBitLamb``, ``OnebitLamb``). Every key of
``params`` is an option of the matching optimizer under the same name, except
``cuda_aware`` and ``comm_backend_name``, which select DeepSpeed's transports
and are ignored with one warning. Unknown keys fail, naming the allowed ones.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from distcomp.errors import ConfigError
from distcomp.optim.adam import OneBitAdam
from distcomp.optim.base import CompressedOptimizer
from distcomp.optim.lamb import OneBitLamb
from distcomp.optim.zoadam import ZeroOneAdam
from distcomp.schema import check_keys

logger = logging.getLogger("distcomp.optim")

OPTIMIZERS: dict[str, type[CompressedOptimizer]] = {
    "onebitadam": OneBitAdam,
    "zerooneadam": ZeroOneAdam,
    "onebitlamb": OneBitLamb,
}
"""DeepSpeed's lower-cased ``optimizer.type`` names and the distcomp optimizer for each."""

TRANSPORT_KEYS = ("cuda_aware", "comm_backend_name")
TRANSPORT_NOTE = (
    "distcomp communicates through torch.distributed on the backend init_process_group chose (gloo, NCCL, ...), "
    "so there is no MPI/NCCL/HCCL/compressed transport to select and no CUDA-aware MPI to configure"
)


def from_deepspeed_config(
    config: dict[str, Any] | str | Path,
    params: Iterable[Any],
    *,
    process_group: dist.ProcessGroup | None = None,
    log_every: int = 0,
) -> CompressedOptimizer:
    """The optimizer a DeepSpeed config's ``optimizer`` section describes, over ``params``.

    ``config`` is a dict, a JSON string or the path of a JSON file.
    """
    raw = _read(config)
    section = raw.get("optimizer")
    if not isinstance(section, dict):
        raise ConfigError("DeepSpeed config: no 'optimizer' section (expected {'type': ..., 'params': {...}})")
    try:
        check_keys(section, ("type", "params"), "", "in 'optimizer'")
    except ConfigError as exc:
        raise ConfigError(f"DeepSpeed config: {exc}") from None
    name = section.get("type")
    cls = OPTIMIZERS.get(str(name).lower())
    if cls is None:
        raise ConfigError(
            f"DeepSpeed config: optimizer type {name!r} is not a compressed optimizer distcomp provides; "
            "expected one of OneBitAdam, ZeroOneAdam, OneBitLamb"
        )
    given = section.get("params")
    if not isinstance(given, (dict, type(None))):
        raise ConfigError(f"DeepSpeed config: 'optimizer.params' must be a mapping, got {given!r}")
    options = dict(given or {})
    if "max_grad_norm" in options:
        raise ConfigError(
            "DeepSpeed config: 'max_grad_norm' is not an optimizer option (DeepSpeed refused it too); "
            "clip with torch.nn.utils.clip_grad_norm_ before optimizer.step()"
        )
    dropped = [k for k in TRANSPORT_KEYS if options.pop(k, None) is not None]
    if dropped:
        logger.warning("%s: ignoring DeepSpeed option(s) %s: %s", cls.algorithm, ", ".join(dropped), TRANSPORT_NOTE)
    try:
        return cls(params, process_group=process_group, log_every=log_every, **options)
    except ConfigError as exc:
        raise ConfigError(f"DeepSpeed config, optimizer {cls.algorithm}: {exc}") from None


def _read(config: dict[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(config, dict):
        return config
    text = str(config)
    try:
        raw = json.loads(text) if text.lstrip().startswith("{") else json.loads(Path(text).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read DeepSpeed config {text}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"DeepSpeed config {text[:60]!r}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError("DeepSpeed config: expected a JSON object at the top")
    return raw
