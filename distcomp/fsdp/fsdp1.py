"""Compression for FSDP1 (``FullyShardedDataParallel``) through its communication hook.

FSDP1 flattens each unit's parameters into one ``FlatParameter``. For the sharded
strategies (``FULL_SHARD``, ``SHARD_GRAD_OP``) its comm hook receives the unit's
flat gradient, zero-padded to ``world_size`` equal chunks, and this rank's chunk
to fill; with a hook FSDP skips its own pre- and post-divide, so the hook does
them. distcomp runs the same reduce-scatter core as for FSDP2
(:func:`~distcomp.fsdp.reduce_scatter.reduce_chunks`) on those chunks.

torch hands one hook state to every FSDP unit, so after ``register_comm_hook``
each unit's state is replaced by its own (a private attribute, checked). A
unit's residual covers its padded flat gradient; checkpoints hold it sliced per
parameter (by fully-qualified name, in the parameter's shape), and the padding
between and after parameters is kept at zero and never saved.

Not supported (refused with the fix): ``NO_SHARD`` and the hybrid strategies
(torch allows no comm hook for hybrid ones), registering after the first
forward, and error-feedback modes other than fp32, bf16 and none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
from torch.distributed.fsdp._common_utils import clean_tensor_name

from distcomp.agreement import check_agreement
from distcomp.compressor import Compressor
from distcomp.config import config_to_dict
from distcomp.errors import CheckpointError, ConfigError, DistcompError
from distcomp.fsdp.modules import ParamSlot
from distcomp.fsdp.reduce_scatter import reduce_chunks
from distcomp.fsdp.state import RESIDUAL_DTYPES, STATE_FORMAT, ErrorFeedbackMode, FSDPCompressionState, Unit
from distcomp.rankstate import check_rank_state
from distcomp.workspace import Workspace

__all__ = ["FSDP1_FORMAT", "FSDP1CompressionState", "is_fsdp1", "register_fsdp1"]

FSDP1_FORMAT = "distcomp.fsdp1/1"
EF_MODES_FSDP1 = (*RESIDUAL_DTYPES, "none")
_SHARDED = (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP)
_FLAT = "\0flat"
"""Suffix of the one internal slot covering a unit's whole chunk (never a parameter name)."""


@dataclass(frozen=True)
class FlatSlot:
    """One parameter inside a unit's unsharded flat gradient."""

    name: str
    """Fully-qualified name, as in the model's state_dict."""
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Elements of the parameter."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class FlatLayout:
    """A unit's flat gradient: its parameters and its size once padded to ``world_size`` chunks."""

    unit: str
    slots: tuple[FlatSlot, ...]
    padded_numel: int

    def padding(self) -> torch.Tensor | None:
        """Bool mask over the padded flat gradient, True where no parameter is (None if there is none)."""
        mask = torch.ones(self.padded_numel, dtype=torch.bool)
        for slot in self.slots:
            mask[slot.offset : slot.offset + slot.numel] = False
        return mask if bool(mask.any()) else None


def is_fsdp1(model: nn.Module) -> bool:
    """Whether ``model`` is an FSDP1 ``FullyShardedDataParallel`` wrapper."""
    return isinstance(model, FullyShardedDataParallel)


def contains_fsdp1(model: nn.Module) -> bool:
    """Whether any submodule of ``model`` is wrapped by FSDP1."""
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def register_fsdp1(
    root: FullyShardedDataParallel,
    comp: Compressor,
    *,
    error_feedback: str = "fp32",
    log_every: int = 0,
) -> FSDP1CompressionState:
    """Compress an FSDP1 model's gradient reduce-scatter through ``register_comm_hook``.

    ``root`` is the outermost ``FullyShardedDataParallel`` wrapper, before its first
    forward. Every FSDP unit must use ``FULL_SHARD`` or ``SHARD_GRAD_OP``.
    """
    if error_feedback not in EF_MODES_FSDP1:
        raise ConfigError(
            f"error_feedback={error_feedback!r} is not available with FSDP1; use one of "
            f"{', '.join(EF_MODES_FSDP1)} (FSDP2's fully_shard supports every mode)"
        )
    modules = _check_root(root)
    group = root.process_group
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    layouts = [_layout(name, module, world_size) for name, module in modules]
    units = [Unit(lay.unit, (ParamSlot(lay.unit + _FLAT, 0, lay.padded_numel // world_size),)) for lay in layouts]
    settings = {
        **config_to_dict(comp.config),
        "error_feedback": error_feedback,
        "fsdp1_units": [[lay.unit, lay.padded_numel] for lay in layouts],
    }
    check_agreement(settings, group)
    state = FSDP1CompressionState(
        root,
        comp,
        units,
        layouts,
        error_feedback=cast(ErrorFeedbackMode, error_feedback),
        world_size=world_size,
        rank=rank,
        log_every=log_every,
    )
    root.register_comm_hook(None, _hook)
    for index, ((_, module), layout) in enumerate(zip(modules, layouts)):
        _bind(module, _UnitHook(state, module, layout, index))
    return state


def _check_root(root: FullyShardedDataParallel) -> list[tuple[str, FullyShardedDataParallel]]:
    """The root's FSDP units that hold parameters, ``(clean name, module)``; refuses what is not supported."""
    wrapped = [(clean_tensor_name(n), m) for n, m in root.named_modules() if isinstance(m, FullyShardedDataParallel)]
    for name, module in wrapped:
        strategy = module.sharding_strategy
        if strategy not in _SHARDED:
            raise ConfigError(
                f"FSDP1 unit {name or '<root>'!r} uses {strategy.name}: distcomp compresses FSDP1 only with "
                "FULL_SHARD or SHARD_GRAD_OP. For replicated gradients (NO_SHARD) use DDP with "
                "distcomp.register; for hybrid sharding use FSDP2 (fully_shard on the shard mesh) with "
                "distcomp.fsdp.register(model, ..., replicate_group=...)"
            )
        if module._comm_hook is not None:
            raise ConfigError("this FSDP1 model already has a communication hook: call distcomp.fsdp.register once")
    if root._is_root is False:
        raise ConfigError("distcomp.fsdp.register needs the outermost FullyShardedDataParallel wrapper (the root)")
    if _forward_ran(root, wrapped):
        raise ConfigError(
            "FSDP1 takes its communication hook only before the first forward: call distcomp.fsdp.register "
            "right after wrapping the model (before training or a warm-up step)"
        )
    units = [(n, m) for n, m in wrapped if m._handle is not None and m._handle.flat_param.requires_grad]
    if not units:
        raise ConfigError("this FSDP1 model has no trainable parameters to compress")
    return units


def _forward_ran(root: FullyShardedDataParallel, wrapped: list[tuple[str, FullyShardedDataParallel]]) -> bool:
    """Whether FSDP1 has run a forward (it records the order of its units then) or finished an iteration."""
    order = getattr(root, "_exec_order_data", None)
    if order is not None and getattr(order, "_iter", 0) > 0:
        return True
    return any(getattr(m._handle, "_pre_forward_order_index", None) is not None for _, m in wrapped)


def _layout(name: str, module: FullyShardedDataParallel, world_size: int) -> FlatLayout:
    """Where each of the unit's parameters sits in its flat gradient (alignment padding skipped)."""
    flat = cast(Any, module._handle).flat_param  # _check_root keeps only units with a flat parameter
    prefix = f"{name}." if name else ""
    slots: list[FlatSlot] = []
    offset, index = 0, 0
    for numel, is_padding in zip(flat._numels_with_padding, flat._is_padding_mask):
        if not is_padding:
            fqn = clean_tensor_name(flat._fqns[index])
            slots.append(FlatSlot(prefix + fqn, offset, tuple(flat._shapes[index])))
            index += 1
        offset += numel
    total = flat._unpadded_unsharded_size.numel()
    if offset != total:
        raise DistcompError(
            f"FSDP1 unit {name or '<root>'!r}: its flat parameter's layout ({offset} elements) does not add up "
            f"to its size ({total}); this torch version packs FlatParameter differently than distcomp expects"
        )
    chunk = -(-total // world_size)
    return FlatLayout(name, tuple(slots), chunk * world_size)


class _UnitHook:
    """The comm-hook state of one FSDP1 unit: which unit FSDP is reducing, and its divide factors."""

    def __init__(
        self, state: FSDP1CompressionState, module: FullyShardedDataParallel, layout: FlatLayout, index: int
    ) -> None:
        self.state = state
        self.module = module
        self.layout = layout
        self.index = index
        self.ws = Workspace()
        self._mask = layout.padding()

    def reduce(self, grad: torch.Tensor, output: torch.Tensor) -> None:
        """Reduce-scatter ``grad`` (the padded flat gradient) into ``output`` as FSDP1 would, compressed."""
        module = self.module
        group = cast(dist.ProcessGroup, module.process_group)
        pre, post = module._gradient_predivide_factor, module._gradient_postdivide_factor

        def exact() -> None:
            # FSDP1's own path without a hook (_reduce_grad): pre-divide, sum, post-divide.
            if pre > 1:
                grad.div_(pre)
            dist.reduce_scatter_single(output, grad, group=group)
            if post > 1:
                output.div_(post)

        if grad.numel() != self.layout.padded_numel:
            raise DistcompError(
                f"FSDP1 unit {self.layout.unit or '<root>'!r} reduced {grad.numel()} values but its layout has "
                f"{self.layout.padded_numel}; this torch version pads FlatParameter gradients differently"
            )
        mask = self._mask
        if mask is not None and mask.device != grad.device:
            mask = self._mask = mask.to(grad.device)
        reduce_chunks(
            self.state,
            self.layout.unit,
            self.index,
            self.ws,
            output,
            grad,
            group,
            exact=exact,
            # FSDP1 reduces to sum / (pre * post): the mean when pre * post is the world size.
            scale=lambda w: w / (pre * post),
            padding=mask,
        )


def _hook(unit: Any, grad: torch.Tensor, output: torch.Tensor | None = None) -> None:
    """The comm hook registered on the root: each unit's own state says which unit this is."""
    if not isinstance(unit, _UnitHook):
        raise DistcompError(
            "distcomp's FSDP1 comm hook was called without its per-unit state: an FSDP unit was added "
            "after distcomp.fsdp.register; register after the whole model is wrapped"
        )
    if output is None:
        raise ConfigError(
            "distcomp's FSDP1 hook handles sharded strategies only; for NO_SHARD use DDP with distcomp.register"
        )
    unit.reduce(grad, output)


def _bind(module: FullyShardedDataParallel, unit: _UnitHook) -> None:
    """Give ``module`` its own hook state (torch shares one state across units); checks torch's layout."""
    if getattr(module, "_comm_hook", None) is not _hook or not hasattr(module, "_comm_hook_state"):
        raise DistcompError(
            "torch's FullyShardedDataParallel keeps its comm hook where distcomp does not expect it "
            "(_comm_hook / _comm_hook_state); this torch version is not supported for FSDP1: use FSDP2's fully_shard"
        )
    module._comm_hook_state = unit


class FSDP1CompressionState(FSDPCompressionState):
    """The state of a compressed FSDP1 model: ``stats()``, ``state_dict()``, ``load_state_dict()``, ``close()``.

    As for FSDP2, except for the checkpoint layout: each parameter's residual is
    this rank's error on that parameter's whole (unsharded) gradient, in the
    parameter's shape, keyed by its fully-qualified name; format ``distcomp.fsdp1/1``.
    """

    def __init__(
        self,
        model: nn.Module,
        compressor: Compressor,
        units: list[Unit],
        layouts: list[FlatLayout],
        **kwargs: Any,
    ) -> None:
        super().__init__(model, compressor, units, **kwargs)
        self.layouts = {lay.unit: lay for lay in layouts}

    def state_dict(self) -> dict[str, Any]:
        """This rank's state (tensors and plain values; loadable with ``torch.load(weights_only=True)``)."""
        out = super().state_dict()
        flat = out["residuals"]
        residuals: dict[str, torch.Tensor] = {}
        for layout in self.layouts.values():
            held = flat.get(layout.unit + _FLAT)
            if held is None:
                continue
            values = held.reshape(-1)
            for slot in layout.slots:
                residuals[slot.name] = values[slot.offset : slot.offset + slot.numel].reshape(slot.shape).clone()
        return {**out, "format": FSDP1_FORMAT, "residuals": residuals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; another config, world size, rank or model is a :class:`CheckpointError`."""
        check_rank_state(
            state,
            fmt=FSDP1_FORMAT,
            what="FSDP1 compression",
            config=config_to_dict(self.compressor.config),
            options={"error_feedback": self.error_feedback},
            world={"world_size": self.world_size},
            rank=self.rank,
            world_fix="resume with the same world size",
        )
        residuals = dict(state["residuals"])
        flat = {lay.unit + _FLAT: t for lay in self.layouts.values() if (t := self._flat(lay, residuals)) is not None}
        if residuals:
            raise CheckpointError(
                f"checkpoint has residuals for parameters this model does not shard: {sorted(residuals)[:5]}; "
                "resume with the same model and the same FSDP wrapping"
            )
        super().load_state_dict({**state, "format": STATE_FORMAT, "residuals": flat})

    def _flat(self, layout: FlatLayout, residuals: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The unit's ``[world_size, chunk]`` residual from per-parameter ones (popped); None if it has none."""
        parts = [residuals.pop(slot.name, None) for slot in layout.slots]
        if all(p is None for p in parts):
            return None
        if any(p is None or tuple(p.shape) != slot.shape for p, slot in zip(parts, layout.slots)):
            raise CheckpointError(
                f"residuals of FSDP1 unit {layout.unit or '<root>'!r} do not match its parameters: the "
                "checkpoint was written for another model or wrapping; resume with the same model and wrapping"
            )
        out = torch.zeros(layout.padded_numel, dtype=RESIDUAL_DTYPES[self.error_feedback])
        for part, slot in zip(parts, layout.slots):
            out[slot.offset : slot.offset + slot.numel] = cast(torch.Tensor, part).reshape(-1)
        return out.view(self.world_size, -1)
