"""Find the FSDP2 modules of a model and name the parameters each one reduces.

FSDP2's extension points (`set_custom_reduce_scatter`, `set_all_reduce_hook`) are per
module and not recursive, so distcomp walks the model itself. Residuals and checkpoints
are keyed by fully-qualified parameter names, never by offsets in FSDP's flat buffers,
so a checkpoint stays readable when FSDP changes how it packs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from distcomp.errors import ConfigError

__all__ = ["ParamSlot", "fsdp_modules", "module_names", "managed_parameters", "reduce_scatter_layout"]


@dataclass(frozen=True, slots=True)
class ParamSlot:
    """Where one parameter sits inside each rank's chunk of a reduce-scatter input.

    FSDP2 packs the reduce-scatter input as world_size chunks; chunk r holds, for every
    parameter with a gradient in order, that parameter's padded shard r flattened.
    """

    name: str
    """Fully-qualified parameter name, from the model passed to `register`."""
    offset: int
    """Start of this parameter inside one rank's chunk (elements)."""
    numel: int
    """Padded shard size (elements): ceil(dim0 / world_size) rows of the parameter."""


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    """Every FSDP2 module of `model` (itself included), in `named_modules()` order.

    Raises ConfigError when there is none (call `fully_shard` first) or when a module
    holds several parameter groups, which FSDP2's per-module setters refuse.
    """
    found: list[FSDPModule] = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not found:
        raise ConfigError(
            f"{type(model).__name__} has no FSDP2 module: wrap it with "
            "torch.distributed.fsdp.fully_shard (each block, then the root) before "
            "calling distcomp.fsdp.register; for DDP use distcomp.register"
        )
    for module in found:
        groups = module._get_fsdp_state()._fsdp_param_groups
        if len(groups) > 1:
            raise ConfigError(
                f"FSDP module {type(module).__name__} has {len(groups)} parameter groups "
                "(a per-parameter mesh from shard_placement_fn): FSDP2's custom "
                "reduce-scatter and all-reduce hook take one group per module; shard "
                "such parameters in a submodule of their own"
            )
    return found


def module_names(model: nn.Module) -> dict[int, str]:
    """Map id(module) -> its qualified name in `model` ("" for the root), for messages and keys."""
    return {id(m): name for name, m in model.named_modules()}


def managed_parameters(model: nn.Module, module: FSDPModule) -> list[tuple[str, nn.Parameter]]:
    """The parameters `module` shards (not those of nested FSDP modules), with full names.

    The order is FSDP's own: `module.parameters()` order minus those of nested FSDP
    modules, which is how `fully_shard` collects what it manages.
    """
    assert isinstance(module, nn.Module)
    prefix = module_names(model)[id(module)]
    nested: set[int] = set()
    for sub in module.modules():
        if sub is not module and isinstance(sub, FSDPModule):
            nested.update(id(p) for p in sub.parameters())
    out = []
    for name, param in module.named_parameters(prefix=prefix):
        if id(param) not in nested:
            out.append((name, param))
    return out


def padded_shard_numel(shape: torch.Size | tuple[int, ...], world_size: int) -> int:
    """Elements of one padded shard of a parameter of `shape` sharded on dim 0."""
    if len(shape) == 0:
        return 1
    rows = math.ceil(shape[0] / world_size)
    return rows * math.prod(shape[1:])


def reduce_scatter_layout(model: nn.Module, module: FSDPModule, world_size: int) -> list[ParamSlot]:
    """Where each trainable parameter of `module` sits in one rank's reduce-scatter chunk.

    Frozen parameters (requires_grad False) get no gradient and no slot. The shapes are
    the unsharded ones (`DTensor.shape` of the sharded parameter).
    """
    slots = []
    offset = 0
    for name, param in managed_parameters(model, module):
        if not param.requires_grad:
            continue
        numel = padded_shard_numel(tuple(param.shape), world_size)
        slots.append(ParamSlot(name, offset, numel))
        offset += numel
    return slots
