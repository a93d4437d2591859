"""A compressed FSDP2 gradient reduce-scatter (torch's ``ReduceScatter`` comm interface).

FSDP2 hands the comm a flat input of ``world_size`` chunks (chunk r: every
parameter's padded shard r, in order) and wants this rank's chunk reduced with
``op``. Exact path: ``reduce_scatter_single``, as FSDP itself does. Compressed
path: each rank encodes its ``world_size`` chunks, one all-to-all carries them,
and each rank decodes and sums the chunks it received (phase 1 of the two-phase
mean, :func:`~distcomp.collectives.compressed_reduce_scatter`). The pre- and
post-divide factors FSDP applies around the comm stay FSDP's; ``op`` (AVG, SUM,
PREMUL_SUM with its factor) is applied here to the decoded sum.

Block codecs (sign, int8, int4) need chunks that are a whole number of blocks:
each rank's chunk is zero-padded to one. Sign's per-block scale (the mean
magnitude) counts those zeros, so the last block of a chunk is sent scaled down;
error feedback returns the difference in later steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed import ReduceOp
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

from distcomp.codecs import CastCodec, ChunkCodec
from distcomp.collectives import compressed_reduce_scatter
from distcomp.comm import DENSE_BYTES_PER_ELEMENT, BucketRecord, Comm
from distcomp.errors import ConfigError
from distcomp.numerics import local_health
from distcomp.workspace import Workspace

if TYPE_CHECKING:
    from distcomp.fsdp.state import FSDPCompressionState

__all__ = ["CompressedReduceScatter", "op_scale", "reduce_chunks"]


def op_scale(op: Any, world_size: int) -> float:
    """What the mean over ranks is multiplied by to give ``op``'s result: AVG 1, SUM w, PREMUL_SUM w * factor."""
    kind = getattr(op, "op", op)
    if kind == ReduceOp.AVG:
        return 1.0
    if kind == ReduceOp.SUM:
        return float(world_size)
    if kind == ReduceOp.PREMUL_SUM:
        return float(world_size) * float(op.factor)
    raise ConfigError(f"FSDP asked for a reduce-scatter with op {op}: distcomp handles AVG, SUM and PREMUL_SUM")


class CompressedReduceScatter(ReduceScatter):
    """One FSDP module's reduce-scatter; its residuals and counters live in the shared state."""

    def __init__(self, state: FSDPCompressionState, unit: str, index: int) -> None:
        self.state = state
        self.unit = unit
        """Qualified name of the FSDP module ("" for the root): the key of its residuals."""
        self.index = index
        self.ws = Workspace()

    def allocate(self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A plain tensor: the compressed path copies out of it, so no special memory is needed."""
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: Any,
        async_op: bool = False,
    ) -> dist.Work | None:
        """Reduce ``input_tensor``'s chunks into ``output_tensor``; synchronous (returns None)."""
        reduce_chunks(
            self.state,
            self.unit,
            self.index,
            self.ws,
            output_tensor,
            input_tensor,
            group,
            exact=lambda: _exact(output_tensor, input_tensor, group, op),
            scale=lambda w: op_scale(op, w),
        )
        return None


def reduce_chunks(
    state: FSDPCompressionState,
    unit: str,
    index: int,
    ws: Workspace,
    output: torch.Tensor,
    inp: torch.Tensor,
    group: dist.ProcessGroup,
    *,
    exact: Callable[[], None],
    scale: Callable[[int], float],
    padding: torch.Tensor | None = None,
) -> None:
    """One FSDP unit's reduce-scatter of ``inp`` (``world_size`` chunks) into ``output`` (this rank's chunk).

    The core shared by FSDP2's comm and FSDP1's comm hook. Steps that do not
    compress run ``exact`` (the wrapper's own FSDP call, so ``none`` stays
    bit-identical); compressed steps add the unit's residual, encode, exchange by
    all-to-all, decode-and-sum this rank's chunk, multiply the mean by
    ``scale(world_size)`` and stage the new residual. ``padding`` (bool, shaped
    like ``inp``) marks entries that belong to no parameter: their residual is
    kept at zero, so a residual saved by parameter name is all there is.
    """
    state.begin_call(unit)
    record = BucketRecord(index=index, numel=inp.numel())
    comm = Comm(group, record)
    # The dense baseline is FSDP's fp32 reduce-scatter, not the all-reduce Comm assumes.
    w = comm.world_size
    record.dense_bytes = (w - 1) / w * DENSE_BYTES_PER_ELEMENT * inp.numel()
    start = time.perf_counter()
    if not state.compressing():
        comm._timed(inp, (w - 1) / w, exact)
    else:
        _compressed(state, unit, comm, ws, output, inp, scale(w), padding)
    record.total_s = time.perf_counter() - start
    state.telemetry.add(state.step, record)


def _compressed(
    state: FSDPCompressionState,
    unit: str,
    comm: Comm,
    ws: Workspace,
    output: torch.Tensor,
    inp: torch.Tensor,
    scale: float,
    padding: torch.Tensor | None,
) -> None:
    w, shard = comm.world_size, output.numel()
    x = inp.view(w, shard).float()
    residual = state.residual(unit, w, shard, x.device)
    if residual is not None:
        x = x + residual
    mean, local, health = _reduce(state, comm, ws, x)
    finite = bool(torch.isfinite(health).all())
    comm.record.compressed = True
    comm.record.nonfinite = not finite
    if not finite:
        # Every rank saw the same health words: all outputs are non-finite, so a scaler skips the step.
        output.fill_(float("nan"))
        state.stage(unit, None)
        return
    if residual is not None:
        new = x - local
        if padding is not None:
            new.masked_fill_(padding.view(w, shard), 0.0)
        comm.record.residual_norm = float(new.norm())
        state.stage(unit, new)
    output.copy_(mean.mul_(scale))


def _reduce(
    state: FSDPCompressionState, comm: Comm, ws: Workspace, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean of this rank's chunk [s], this rank's decoded input [w, s], health)`` for ``x`` [w, s] fp32."""
    kind, codec = state.codec(comm, x.device)
    if kind == "block":
        return _block(comm, codec, x, ws)
    if kind == "cast":
        return _cast(comm, codec, x)
    return _sparse(comm, state, x)


def _exact(output: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup, op: Any) -> None:
    """FSDP's own reduce-scatter call, so that ``none`` is bit-identical to FSDP without a custom comm.

    gloo has no PREMUL_SUM: there the input is multiplied by the factor and summed,
    which is what PREMUL_SUM does where it exists.
    """
    if getattr(op, "op", op) == ReduceOp.PREMUL_SUM and dist.get_backend(group) == "gloo":
        inp = inp.mul(float(op.factor))
        op = ReduceOp.SUM
    dist.reduce_scatter_single(output=output, input=inp, op=op, group=group)


def _block(
    comm: Comm, codec: ChunkCodec, x: torch.Tensor, ws: Workspace
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sign / int8 / int4: rows padded to the codec's alignment so chunks match FSDP's shards."""
    w, s = x.shape
    a = codec.align
    padded = -(-s // a) * a if s else a
    rows = x if padded == s else torch.nn.functional.pad(x, (0, padded - s))
    chunk, local, health = compressed_reduce_scatter(comm, codec, rows.reshape(-1), None, ws)
    return chunk[:s].clone(), local.view(w, padded)[:, :s], health


def _cast(comm: Comm, codec: CastCodec, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 / fp16: each chunk cast and sent by all-to-all, then summed in fp32 by its owner."""
    health = local_health(x)
    wire = codec.encode(x)
    received = comm.all_to_all(wire)
    healths = comm.all_gather(health)
    local = codec.decode(wire, out=torch.empty_like(x))
    mean = codec.decode(received, out=torch.empty_like(x)).sum(dim=0).div_(comm.world_size)
    return mean, local, healths.sum().reshape(1)


def _sparse(
    comm: Comm, state: FSDPCompressionState, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk / randomk: each rank's chunk r sparsified and sent to rank r, which adds up what it gets.

    Random-k draws its indices from a generator seeded alike on every rank, so the
    owner of chunk r drew the same indices as every sender: only values travel.
    """
    w, s = x.shape
    healths = comm.all_gather(local_health(x))
    local = torch.zeros_like(x)
    mean = torch.zeros(s, dtype=torch.float32, device=x.device)
    k = state.sparse_k(s)
    if k == 0:
        return mean, local, healths.sum().reshape(1)
    codecs = [state.sparse_codec(s, k, x.device) for _ in range(w)]
    payloads = torch.stack([codec.encode(x[r]) for r, codec in enumerate(codecs)])
    for r, codec in enumerate(codecs):
        codec.decode_add(payloads[r], local[r])
    received = comm.all_to_all(payloads)
    mine = codecs[comm.rank]
    for row in received:
        mine.decode_add(row, mean)
    return mean.div_(w), local, healths.sum().reshape(1)
