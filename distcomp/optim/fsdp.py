"""FSDP2 with a compressed optimizer: the 1-bit exchange is FSDP's own reduce-scatter.

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = distcomp.optim.OneBitAdam(model.parameters(), lr=1e-3, freeze_step=400)
    distcomp.optim.register(model, opt)

1-bit Adam compresses each rank's local momentum ``m_i = beta1 m + (1 - beta1) g_i``
over the whole model. Under FSDP a rank holds only its shard of the averaged
momentum ``m``, but during backward FSDP hands each unit's reduce-scatter the
rank's whole local gradient ``g_i``. The second phase of the 1-bit exchange
all-gathers the new ``m`` as signs and block scales anyway, so every rank keeps
that 1-bit copy of each unit's ``m`` (1/32 of its fp32 size) and the
reduce-scatter rebuilds ``m_i`` from it, runs the two-phase exchange with worker
and server error feedback, and hands the optimizer its shard of the new ``m``.
That is the algorithm 1-bit Adam runs on DDP, on the same bytes.

Compressing the gradient instead (and running the momentum recurrence on the
shard) needs no copy of ``m``, but on a simulated 4-rank GPT run it ended 0.22
nats above AdamW in held-out loss where compressing the momentum ended 0.009
above (``benchmarks/onebit_formulation.py``, ``docs/optimizers.md``). Warm-up
steps use FSDP's exact reduce-scatter; which one runs is decided per backward
from the optimizer's step counter.

The worker error is as large as each unit's unsharded gradient (as for any
compressed FSDP reduce-scatter); ``error_feedback`` stores it in fp32, bf16 or
int8 blocks (:mod:`distcomp.fsdp.state`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ReduceOp
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from distcomp.codecs import SignCodec
from distcomp.comm import DENSE_BYTES_PER_ELEMENT, BucketRecord, Comm
from distcomp.errors import ConfigError, DistcompError
from distcomp.exchange import TwoPhaseExchange
from distcomp.fsdp.modules import ParamSlot, fsdp_modules, module_names, reduce_scatter_layout
from distcomp.fsdp.reduce_scatter import CompressedReduceScatter
from distcomp.fsdp.state import ErrorFeedbackMode, FSDPCompressionState, Unit
from distcomp.optim.base import CompressedOptimizer
from distcomp.optim.state import like_param
from distcomp.registry import make_compressor

logger = logging.getLogger("distcomp.optim")
FORMAT = "distcomp.optim.fsdp/1"


class _OptimizerTelemetry:
    """The reduce-scatters' records, filed in the optimizer's telemetry under the optimizer's step."""

    def __init__(self, optimizer: CompressedOptimizer) -> None:
        self._optimizer = optimizer

    def add(self, step: int, rec: BucketRecord) -> None:
        self._optimizer.comm.record(rec)

    def end_step(self) -> None:
        """The optimizer's step closes its telemetry step."""

    def summary(self) -> dict[str, Any]:
        return self._optimizer.telemetry.summary()


class _UnitResiduals:
    """The exchange's worker residuals (:class:`~distcomp.exchange.WorkerResiduals`), held by the FSDP state."""

    def __init__(self, state: ShardedGradients) -> None:
        self.state = state
        self._open: dict[str, torch.Tensor] = {}

    def residual(self, unit: str) -> torch.Tensor:
        w, shard = self.state.world_size, self.state.units[unit].shard_numel
        held = self.state.residual(unit, w, shard, self.state.device)
        # A copy: the exchange writes the new residual over it before the step is known finite.
        self._open[unit] = torch.zeros(w * shard) if held is None else held.reshape(-1).clone()
        return self._open[unit]

    def next_residual(self, unit: str) -> None:
        return None

    def stage(self, unit: str) -> float:
        new = self._open.pop(unit)
        self.state.stage(unit, new.view(self.state.world_size, -1))
        return float(new.norm())

    def end_step(self, keep: bool) -> None:
        self._open.clear()


class ShardedGradients(FSDPCompressionState):
    """Every FSDP unit's reduce-scatter, run for a compressed optimizer (see the module docstring).

    Holds, per unit: the worker error (``[world_size, shard]``, in the
    ``error_feedback`` format), this rank's server error, and the 1-bit copy of
    the averaged momentum. Checkpointed inside the optimizer's ``state_dict()``.
    """

    def __init__(
        self, optimizer: CompressedOptimizer, params: Mapping[str, torch.Tensor], *args: Any, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.optimizer = optimizer
        self.params = params
        """The sharded parameters by qualified name (the units' slots name them)."""
        self.telemetry = _OptimizerTelemetry(optimizer)  # type: ignore[assignment]
        self.served_step: int | None = None
        self.device = next(iter(params.values())).device if params else torch.device("cpu")
        self.sign = SignCodec(optimizer.config.block)
        self.exchange = TwoPhaseExchange(optimizer.algorithm, _unit_key, _UnitResiduals(self), staged=True)
        self.momentum: dict[str, torch.Tensor] = {}
        """Each unit's averaged momentum as sign payload (padded to whole blocks), identical on every rank."""
        self._next_momentum: dict[str, torch.Tensor] = {}
        self._shards: dict[str, torch.Tensor] = {}

    # -- the step ------------------------------------------------------------------------

    def begin_call(self, unit: str) -> None:
        if unit in self._called or not self._called:
            if self._called:
                self._end_step()
            self.exchange.begin_step()
        super().begin_call(unit)
        self.served_step = self.optimizer.steps

    def _end_step(self) -> None:
        keep = not self._nonfinite
        self.exchange.end_step(keep)
        if keep:
            self.momentum.update(self._next_momentum)
        else:
            self._shards.clear()
        self._next_momentum = {}
        super()._end_step()

    def compressing(self) -> bool:
        """Whether the optimizer's coming step takes this rank's own gradient (it then gets the 1-bit mean)."""
        return self.optimizer.gradient_mode(self.optimizer.steps) == "local"

    def check_served(self, step: int) -> None:
        """Raise unless the last backward pass reduce-scattered through distcomp for optimizer step ``step``."""
        if self.served_step != step:
            raise RuntimeError(
                f"{self.optimizer.algorithm}: step {step} was called but FSDP's backward pass did not reduce-scatter "
                f"through distcomp for it (last served: {self.served_step}); run backward on the FSDP model "
                "(with gradient sync on for the last micro-batch) before every optimizer step"
            )

    def take_momentum(self) -> dict[str, torch.Tensor]:
        """This rank's shard row of each unit's new momentum (``[shard]``), once the step is known finite."""
        self.flush()
        out, self._shards = self._shards, {}
        return out

    # -- one unit ------------------------------------------------------------------------

    def commit_momentum(self, finite: bool) -> None:
        """Write this rank's shard of each unit's new momentum into the optimizer's ``exp_avg`` (finite steps)."""
        self.flush()
        shards, self._shards = self._shards, {}
        if not finite:
            return
        units = self.units
        rows = {id(self.params[slot.name]): (row, slot) for unit, row in shards.items() for slot in units[unit].slots}
        flat = self.optimizer.flat
        for layout in flat.layouts:  # bucket by bucket: low-bit state decodes one bucket at a time
            mine = [(i, rows[id(p)]) for i, p in enumerate(layout.owners) if id(p) in rows]
            if not mine:
                continue
            views = layout.views(flat.buffer(layout, "exp_avg"))
            for i, (row, slot) in mine:
                views[i].view(-1).copy_(row[slot.offset : slot.offset + views[i].numel()])

    def exchange_momentum(
        self, comm: Comm, unit: str, grad: torch.Tensor, beta1: float
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This rank's rows ``(old, new)`` of the unit's averaged momentum, from its gradient; None if non-finite."""
        w, shard = grad.shape
        if shard != self.units[unit].shard_numel:
            self.residual(unit, w, shard, grad.device)  # raises, naming the fix
        old = self._momentum(unit, w, shard)
        before = old[self.rank].clone()
        local_m = old.lerp_(grad, 1 - beta1)
        scales = self._scales(unit)
        for slot, scale in scales:
            local_m[:, slot.offset : slot.offset + slot.numel].mul_(scale)
        res = self.exchange.reduce(comm, self.sign, local_m.view(-1), unit)
        if res.nonfinite:
            self.stage(unit, None)
            return None
        mean = res.out.view(w, shard)
        # Kept as sent (scaled): its blocks are then exactly what the 1-bit code holds.
        self._next_momentum[unit] = self._encode(mean.reshape(-1))
        for slot, scale in scales:
            mean[:, slot.offset : slot.offset + slot.numel].div_(scale)
        self._shards[unit] = mean[self.rank].clone()
        return before, self._shards[unit]

    def _scales(self, unit: str) -> list[tuple[ParamSlot, float]]:
        """The optimizer's per-tensor momentum scales (1-bit LAMB's) for the unit's slots, where not 1."""
        scale_of = getattr(self.optimizer, "momentum_scale", None)
        if scale_of is None:
            return []
        scales = [(slot, scale_of(self.params[slot.name])) for slot in self.units[unit].slots]
        return [(slot, s) for slot, s in scales if s != 1.0]

    def _momentum(self, unit: str, w: int, shard: int) -> torch.Tensor:
        """The unit's averaged momentum ``[w, shard]``: decoded from its 1-bit copy, or gathered once, exactly."""
        payload = self.momentum.get(unit)
        if payload is not None:
            n = w * shard
            length = -(-n // self.sign.align) * self.sign.align
            out = self.sign.decode(payload.view(1, -1), length)[0, :n].view(w, shard)
            for slot, scale in self._scales(unit):
                out[:, slot.offset : slot.offset + slot.numel].div_(scale)
            return out
        out = torch.zeros(w, shard, dtype=torch.float32, device=self.device)
        for slot in self.units[unit].slots:  # the first compressed step: the warm-up's exact momentum
            full = self._full_momentum(self.params[slot.name])
            rows = -(-full.shape[0] // w) if full.dim() else 1
            padded = torch.zeros(w * rows, *full.shape[1:], dtype=torch.float32, device=self.device)
            padded[: full.shape[0]] = full
            out[:, slot.offset : slot.offset + slot.numel] = padded.view(w, -1)
        return out

    def _full_momentum(self, param: torch.Tensor) -> torch.Tensor:
        """The whole averaged momentum of ``param``, gathered from every rank's shard (a collective)."""
        flat = self.optimizer.flat
        for layout in flat.layouts:
            for i, p in enumerate(layout.owners):
                if p is param:
                    view = layout.views(flat.buffer(layout, "exp_avg", write=False))[i]
                    sharded = like_param(view, p)
                    return sharded.full_tensor() if isinstance(sharded, DTensor) else view
        raise DistcompError(
            f"parameter of shape {tuple(param.shape)} is in an FSDP unit but not in the optimizer: build the "
            "optimizer from model.parameters() (frozen parameters need requires_grad=False)"
        )

    def _encode(self, flat: torch.Tensor) -> torch.Tensor:
        align = self.sign.align
        padded = -(-flat.numel() // align) * align
        rows = torch.nn.functional.pad(flat, (0, padded - flat.numel())).view(1, padded)
        payload = torch.empty(1, self.sign.payload_bytes(padded), dtype=torch.uint8, device=flat.device)
        self.sign.encode(rows, payload)
        return payload.view(-1)

    # -- checkpoints ---------------------------------------------------------------------

    def ef_bytes(self) -> int:
        """Worker errors, server errors and the 1-bit momentum copies this rank holds."""
        extra = sum(t.numel() * t.element_size() for t in (*self.exchange.server.values(), *self.momentum.values()))
        return super().ef_bytes() + extra

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["server"] = self.exchange.state_dict()
        out["momentum"] = {unit: p.clone() for unit, p in self.momentum.items()}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.exchange.load_state_dict(state["server"])
        self.momentum = {unit: p.to(self.device, copy=True) for unit, p in state["momentum"].items()}
        self._next_momentum, self._shards = {}, {}


class MomentumReduceScatter(CompressedReduceScatter):
    """One FSDP unit's reduce-scatter for a compressed optimizer: exact in warm-up, the 1-bit momentum after."""

    def __init__(self, state: ShardedGradients, unit: str, index: int) -> None:
        super().__init__(state, unit, index)
        self.sharded = state

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: Any,
        async_op: bool = False,
    ) -> dist.Work | None:
        """FSDP's reduce-scatter (warm-up), or the 1-bit momentum exchange whose shard lands in ``output_tensor``."""
        state, output, grads = self.sharded, output_tensor, input_tensor
        if not state.compressing():
            return super().__call__(output, grads, group, op, async_op)
        state.begin_call(self.unit)
        w = dist.get_world_size(group)
        if getattr(op, "op", op) != ReduceOp.AVG and w > 1:
            raise ConfigError(
                f"{state.optimizer.algorithm} on FSDP needs FSDP's plain averaging reduce-scatter, got op {op}: "
                "use reduce_dtype fp32 or bf16 (MixedPrecisionPolicy) and the default gradient divide factor"
            )
        record = BucketRecord(index=self.index, numel=grads.numel(), compressed=True)
        comm = Comm(group, record)
        record.dense_bytes = (w - 1) / w * DENSE_BYTES_PER_ELEMENT * grads.numel()
        start = time.perf_counter()
        beta1 = state.optimizer.param_groups[0]["betas"][0]
        rows = state.exchange_momentum(comm, self.unit, grads.view(w, -1).float(), beta1)
        if rows is None:
            output.fill_(float("nan"))  # every rank saw it: every rank skips the step
        else:
            # What FSDP leaves in .grad: the averaged gradient this momentum step implies.
            before, after = rows
            output.copy_(after.sub(before, alpha=beta1).div_(1 - beta1))
        record.nonfinite = rows is None
        record.total_s = time.perf_counter() - start
        state.telemetry.add(state.step, record)
        return None


def register_fsdp(
    model: nn.Module, optimizer: CompressedOptimizer, *, error_feedback: str = "fp32"
) -> ShardedGradients:
    """Let ``optimizer`` drive FSDP2's reduce-scatters (see the module docstring); returns their state."""
    if not isinstance(model, FSDPModule):
        raise TypeError(
            "distcomp.optim.register expects a DistributedDataParallel or fully_shard model, "
            f"got {type(model).__name__}"
        )
    _check_optimizer(model, optimizer)
    modules = fsdp_modules(model)
    group = _shard_group(modules)
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    if world_size != optimizer.world_size:
        raise ValueError(
            f"the optimizer's process group has {optimizer.world_size} ranks but FSDP shards over {world_size}; "
            "build the optimizer with process_group= the shard group"
        )
    _check_reduce_dtype(modules, optimizer)
    names = module_names(model)
    units = [Unit(names[id(m)], tuple(reduce_scatter_layout(model, m, world_size))) for m in modules]
    sign = make_compressor("sign", {"block": optimizer.config.block})
    mode = _error_feedback_mode(error_feedback)
    params = dict(model.named_parameters())
    state = ShardedGradients(
        optimizer, params, model, sign, units, error_feedback=mode, world_size=world_size, rank=rank
    )
    for index, (module, unit) in enumerate(zip(modules, units)):
        module.set_custom_reduce_scatter(MomentumReduceScatter(state, unit.name, index))
    optimizer.comm.attach_fsdp(state)
    logger.info("distcomp.optim: %s drives the reduce-scatter of %d FSDP modules", optimizer.algorithm, len(modules))
    return state


def _unit_key(unit: str) -> str:
    return unit


def _check_optimizer(model: nn.Module, optimizer: CompressedOptimizer) -> None:
    if not isinstance(optimizer, CompressedOptimizer):
        raise TypeError(f"distcomp.optim.register expects a distcomp.optim optimizer, got {type(optimizer).__name__}")
    if optimizer.steps or optimizer.comm.connected:
        raise RuntimeError("distcomp.optim.register must be called before the optimizer's first step")
    module_params = {id(p) for p in model.parameters()}
    if any(id(p) not in module_params for g in optimizer.param_groups for p in g["params"]):
        raise ValueError(
            "the optimizer holds parameters that are not in the FSDP model; build it from model.parameters() "
            "after fully_shard"
        )
    betas = {tuple(g["betas"]) for g in optimizer.param_groups}
    if len(betas) > 1:
        raise ConfigError(
            f"{optimizer.algorithm} on FSDP: parameter groups with different betas {sorted(betas)}; an FSDP unit's "
            "momentum is exchanged as one, so use one beta1 for every group"
        )
    check = getattr(optimizer, "check_sharded", None)
    if check is not None:
        check()


def _check_reduce_dtype(modules: list[Any], optimizer: CompressedOptimizer) -> None:
    """fp16 reduction makes FSDP pre- and post-divide around a summing reduce-scatter; the exchange needs means."""
    for module in modules:
        for group in module._get_fsdp_state()._fsdp_param_groups:
            reduce_dtype = group.mp_policy.reduce_dtype or group.mp_policy.param_dtype
            if reduce_dtype == torch.float16:
                raise ConfigError(
                    f"{optimizer.algorithm} on FSDP cannot reduce in float16 (FSDP then pre- and post-divides "
                    "around a summed reduce-scatter); use MixedPrecisionPolicy(reduce_dtype=torch.float32) or bfloat16"
                )


def _error_feedback_mode(mode: str) -> ErrorFeedbackMode:
    from distcomp.fsdp.register import EF_MODES

    if mode not in EF_MODES or mode == "none":
        raise ConfigError(
            f"error_feedback={mode!r}: a compressed optimizer needs its worker error; use one of "
            f"{', '.join(m for m in EF_MODES if m != 'none')}"
        )
    return mode  # type: ignore[return-value]


def _shard_group(modules: list[Any]) -> dist.ProcessGroup | None:
    from distcomp.fsdp.register import _shard_group as group_of

    return group_of(modules)
