"""``distcomp.fsdp.register``: compress an FSDP2 model's gradient reduction."""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from distcomp.errors import DistcompError
from distcomp.fsdp.modules import fsdp_modules


def register(
    model: nn.Module,
    compressor: str | Any,
    /,
    *,
    replicate_group: Any = None,
    error_feedback: str = "fp32",
    log_every: int = 0,
    **config: Any,
) -> Any:
    """Compress ``model``'s gradient reduce-scatter: ``state = distcomp.fsdp.register(model, "int8")``.

    Call on every rank after ``fully_shard`` wrapped the model. With ``replicate_group``
    (HSDP built as 1-D ``fully_shard`` on the shard sub-mesh) the reduce-scatter stays
    exact and the replica all-reduce over ``replicate_group`` is compressed instead.
    """
    if replicate_group is not None:
        return _register_hsdp(model, compressor, replicate_group, log_every, config)
    fsdp_modules(model)
    raise DistcompError("the compressed FSDP2 reduce-scatter is not available yet")


def _register_hsdp(model: nn.Module, compressor: Any, replicate_group: Any, log_every: int, config: dict) -> Any:
    try:
        hsdp = importlib.import_module("distcomp.fsdp.hsdp")
    except ModuleNotFoundError as error:
        if error.name != "distcomp.fsdp.hsdp":
            raise
        raise DistcompError(
            "HSDP compression (replicate_group=...) is not available in this build: "
            "register without replicate_group to compress the FSDP2 reduce-scatter"
        ) from None
    return hsdp.register_hsdp(model, compressor, replicate_group=replicate_group, log_every=log_every, **config)
