"""``distcomp.fsdp.register``: compress an FSDP2 (or FSDP1) model's gradient reduction."""

from __future__ import annotations

import logging
from typing import Any, cast

import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from distcomp.agreement import check_agreement
from distcomp.checkpoint import attach
from distcomp.compressor import Compressor
from distcomp.config import config_to_dict
from distcomp.errors import ConfigError
from distcomp.fsdp.fsdp1 import contains_fsdp1, is_fsdp1, register_fsdp1
from distcomp.fsdp.hsdp import register_hsdp
from distcomp.fsdp.modules import fsdp_modules, module_names, reduce_scatter_layout
from distcomp.fsdp.reduce_scatter import CompressedReduceScatter
from distcomp.fsdp.state import (
    DEFAULT_ERROR_FEEDBACK,
    RESIDUAL_DTYPES,
    ErrorFeedbackMode,
    FSDPCompressionState,
    Unit,
)
from distcomp.registry import make_compressor

logger = logging.getLogger("distcomp")
SUPPORTED = ("none", "sign", "int8", "int4", "bf16", "fp16", "topk", "randomk")
EF_MODES = (*RESIDUAL_DTYPES, "int8", "none")


def register(
    model: nn.Module,
    compressor: str | Any,
    /,
    *,
    replicate_group: Any = None,
    error_feedback: str | None = None,
    log_every: int = 0,
    **config: Any,
) -> Any:
    """Compress ``model``'s gradient reduce-scatter: ``state = distcomp.fsdp.register(model, "int8")``.

    Call on every rank after ``fully_shard`` wrapped the model. ``compressor`` is a
    registered name (options as keyword arguments) or a compressor ``Config``.
    ``error_feedback`` keeps each rank's compression error in ``"fp32"`` (exact,
    4 bytes per element), ``"bf16"`` (2), ``"int8"`` (int8 blocks, 1.03; the FSDP2
    default: its held-out loss stayed within seed noise of fp32 for sign, int8
    and topk in benchmarks/fsdp_error_feedback.py) or not at all (``"none"``); a
    residual covers its FSDP unit's unsharded gradient. HSDP and FSDP1 default
    to ``"fp32"``. With ``replicate_group`` (HSDP built as
    1-D ``fully_shard`` on the shard sub-mesh) the reduce-scatter stays exact and
    the replica all-reduce over ``replicate_group`` is compressed instead. An FSDP1
    ``FullyShardedDataParallel`` root, before its first forward, is compressed through
    its comm hook instead (:mod:`distcomp.fsdp.fsdp1`). Raises
    :class:`~distcomp.errors.RankMismatchError` on every rank if ranks disagree.
    """
    if contains_fsdp1(model):
        state = _register_fsdp1(model, compressor, replicate_group, error_feedback or "fp32", log_every, config)
    elif replicate_group is not None:
        state = register_hsdp(
            model,
            compressor,
            replicate_group=replicate_group,
            error_feedback=error_feedback or "fp32",
            log_every=log_every,
            **config,
        )
    else:
        state = _register_fsdp2(model, compressor, error_feedback, log_every, config)
    attach(model, state)  # for distcomp.state_dict(model) and the resumed-without-state warning
    return state


def _register_fsdp2(
    model: nn.Module, compressor: str | Any, error_feedback: str | None, log_every: int, config: dict[str, Any]
) -> FSDPCompressionState:
    modules = fsdp_modules(model)
    comp = _make_compressor(compressor, config)
    error_feedback = error_feedback or DEFAULT_ERROR_FEEDBACK
    if error_feedback not in EF_MODES:
        raise ConfigError(f"error_feedback={error_feedback!r} is not one of {', '.join(EF_MODES)}")
    group = _shard_group(modules)
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    names = module_names(model)
    units = [Unit(names[id(m)], tuple(reduce_scatter_layout(model, m, world_size))) for m in modules]
    settings = {**config_to_dict(comp.config), "error_feedback": error_feedback, "units": [u.name for u in units]}
    check_agreement(settings, group)
    mode = cast(ErrorFeedbackMode, error_feedback)
    state = FSDPCompressionState(
        model, comp, units, error_feedback=mode, world_size=world_size, rank=rank, log_every=log_every
    )
    for index, (module, unit) in enumerate(zip(modules, units)):
        module.set_custom_reduce_scatter(CompressedReduceScatter(state, unit.name, index))
    logger.info("distcomp.fsdp: %s reduce-scatter on %d FSDP modules", comp.name, len(modules))
    return state


def _register_fsdp1(
    model: nn.Module,
    compressor: str | Any,
    replicate_group: Any,
    error_feedback: str,
    log_every: int,
    config: dict[str, Any],
) -> Any:
    """FSDP1 (``FullyShardedDataParallel``): the comm-hook route of :mod:`distcomp.fsdp.fsdp1`."""
    if not is_fsdp1(model):
        raise ConfigError(
            "this model holds FullyShardedDataParallel (FSDP1) submodules but is not one itself: pass the "
            "outermost FullyShardedDataParallel wrapper to distcomp.fsdp.register"
        )
    if replicate_group is not None:
        raise ConfigError(
            "replicate_group is for HSDP built with FSDP2's fully_shard; FSDP1 hybrid sharding takes no comm "
            "hook: build the model with fully_shard on the shard mesh to compress the replica all-reduce"
        )
    comp = _make_compressor(compressor, config)
    root = cast(FullyShardedDataParallel, model)
    return register_fsdp1(root, comp, error_feedback=error_feedback, log_every=log_every)


def _make_compressor(compressor: str | Any, config: dict[str, Any]) -> Compressor:
    comp = make_compressor(compressor, config)
    if comp.name not in SUPPORTED:
        raise ConfigError(
            f"compressor {comp.name!r} does not compress an FSDP2 reduce-scatter; use one of "
            f"{', '.join(SUPPORTED)} (PowerSGD fits HSDP's replica all-reduce: pass replicate_group)"
        )
    return comp


def _shard_group(modules: list[Any]) -> dist.ProcessGroup | None:
    """The process group FSDP reduce-scatters over (the first module with parameters tells)."""
    for module in modules:
        for group in module._get_fsdp_state()._fsdp_param_groups:
            return group._reduce_scatter_process_group
    return None
