"""What a compressed optimizer's step sends: exact means, health words and the 1-bit exchange.

:class:`GradientComm` is the only part of an optimizer that talks to other
ranks. Every call is synchronous and issued bucket by bucket in the same order
on every rank; each one adds a :class:`~distcomp.comm.BucketRecord` to the
optimizer's telemetry. With DDP (``distcomp.optim.register``) the hook has
already averaged the gradients, or agreed on their health, during the backward
pass, and the matching calls here send nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from distcomp.agreement import check_agreement
from distcomp.codecs import SignCodec
from distcomp.comm import BucketRecord, Comm
from distcomp.exchange import ImmediateResiduals, TwoPhaseExchange
from distcomp.numerics import local_health
from distcomp.optim.layout import FlatLayout, local
from distcomp.optim.state import FlatState
from distcomp.telemetry import Telemetry
from distcomp.workspace import Workspace

if TYPE_CHECKING:
    from distcomp.optim.ddp import OptimizerHookState
    from distcomp.optim.fsdp import ShardedGradients
    from distcomp.optim.overlap import BackwardExchange, Exchanged


def world_of(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(world size, rank)`` of ``group``; ``(1, 0)`` when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


class GradientComm:
    """An optimizer's gradients in, averaged (exactly or in 1 bit) tensors out.

    ``state`` holds the worker and server errors of the 1-bit exchange;
    ``clock`` returns the optimizer's step, under which records are filed.
    Not checkpointed itself: the errors it feeds back are in ``state``.
    """

    def __init__(
        self,
        state: FlatState,
        group: dist.ProcessGroup | None,
        *,
        block: int,
        telemetry: Telemetry,
        clock: Callable[[], int],
    ) -> None:
        self._state = state
        self.algorithm = state.algorithm
        self.group = group
        self.telemetry = telemetry
        self._clock = clock
        self._world: int | None = None
        self._rank = 0
        self._codec = SignCodec(block)
        # Worker errors live in the optimizer's state (viewed per parameter), server errors in
        # ``state.server`` by bucket index; both are renewed as soon as a step is known finite.
        self._exchange = TwoPhaseExchange(
            self.algorithm, _bucket_index, ImmediateResiduals(self._worker_error), staged=False, server=state.server
        )
        self._grads_ws = Workspace()
        self.ddp: OptimizerHookState | None = None
        """The DDP hook that communicates the gradients during backward, once ``register`` attached one."""
        self.fsdp: ShardedGradients | None = None
        """FSDP2's reduce-scatters that deliver this rank's shard of the (1-bit) mean, once ``register`` set them."""
        self.overlap: BackwardExchange | None = None
        """With DDP: the exchanges its hook runs during backward (``register(..., overlap=True)``)."""

    # -- set-up ------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the first step has fixed the world (after which DDP can no longer be attached)."""
        return self._world is not None

    @property
    def world(self) -> int:
        """Ranks of the process group, as fixed by the first step or, before it, as the group has them now."""
        return self._world if self._world is not None else world_of(self.group)[0]

    @property
    def rank(self) -> int:
        """This rank in the process group."""
        return self._rank if self._world is not None else world_of(self.group)[1]

    def connect(self, settings: dict[str, Any]) -> None:
        """Fix the world once and check (a collective, on every rank) that the ranks agree on ``settings``."""
        if self._world is not None:
            return
        self._world, self._rank = world_of(self.group)
        if self._world > 1:
            wrappers = {"ddp": self.ddp is not None, "fsdp": self.fsdp is not None, "overlap": self.overlap is not None}
            check_agreement({**settings, **wrappers}, self.group, what=f"{self.algorithm} settings")

    def attach_ddp(self, hook: OptimizerHookState, overlap: BackwardExchange | None = None) -> None:
        """Let ``hook`` (``distcomp.optim.register``) communicate the gradients; only before :attr:`connected`.

        With ``overlap``, the hook also runs the compressed exchange during backward.
        """
        self.ddp = hook
        self.overlap = overlap

    @property
    def codec(self) -> SignCodec:
        """The 1-bit code of every exchange."""
        return self._codec

    @property
    def exchange_workspace(self) -> Workspace:
        """The exchange's scratch (one bucket's worth), which the overlapped exchange shares."""
        return self._exchange.ws

    def grad_buffer(self, layout: FlatLayout) -> torch.Tensor:
        """The bucket's flat fp32 gradient scratch (also where an overlapped exchange leaves its mean)."""
        return self._grads_ws.get(f"grad{layout.index}", layout.numel, torch.float32, layout.device)

    def take_exchanged(self, step: int) -> Exchanged | None:
        """The exchange DDP's hook ran during backward for ``step``, made current; None: exchange in step()."""
        return None if self.overlap is None else self.overlap.take(step)

    def attach_fsdp(self, gradients: ShardedGradients) -> None:
        """Let FSDP2's reduce-scatters communicate the gradients; only before :attr:`connected`."""
        self.fsdp = gradients

    @property
    def sharded(self) -> bool:
        """Whether FSDP2 delivers each rank's shard of the averaged (or 1-bit averaged) gradient."""
        return self.fsdp is not None

    def check_served(self, step: int) -> None:
        """With DDP or FSDP, raise unless the last backward pass went through distcomp for ``step``."""
        if self.ddp is not None:
            self.ddp.check_served(step)
        if self.fsdp is not None:
            self.fsdp.check_served(step)

    def record(self, rec: BucketRecord) -> None:
        """File ``rec`` under the optimizer's current step (DDP's hook calls this during backward)."""
        self.telemetry.add(self._clock(), rec)

    # -- gradients ---------------------------------------------------------------------------

    def gather(self, grad_scale: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every bucket's gradients as flat fp32 scratch and their health word.

        Divided by ``grad_scale`` when GradScaler drives the step (it sets
        ``optimizer.grad_scale`` instead of unscaling); a missing gradient
        counts as zeros.
        """
        inv = None if grad_scale is None else grad_scale.double().reciprocal().float()
        flats, health = [], None
        for layout in self._state.layouts:
            flat = self.grad_buffer(layout)
            for p, view in zip(layout.owners, layout.views(flat)):
                if p.grad is None:
                    view.zero_()
                elif p.grad.is_sparse:
                    raise RuntimeError(f"{self.algorithm} does not support sparse gradients")
                else:
                    view.copy_(local(p.grad))
            if inv is not None:
                flat.mul_(inv.to(flat.device))
            h = local_health(flat)
            health = h if health is None else health + h.to(health.device)
            flats.append(flat)
        return flats, health if health is not None else torch.zeros(1)

    def exact_mean(self, grads: list[torch.Tensor], health: torch.Tensor) -> bool:
        """Average ``grads`` over ranks in place (unless DDP or FSDP did); False if any rank's were non-finite."""
        if self.fsdp is not None:  # FSDP reduce-scattered them; each rank judged its own shard, so agree
            return self.agree(health, compressed=False)
        if self.ddp is not None or self._world == 1:
            return _finite(health)
        for layout, flat in zip(self._state.layouts, grads):
            comm = self._bucket(layout.index, layout.numel)
            start = time.perf_counter()
            flat.div_(self.world)  # divide first, like DDP (keeps the sum from overflowing)
            comm.all_reduce(flat)
            comm.record.total_s = time.perf_counter() - start
            self.record(comm.record)
        return _finite(sum((local_health(f) for f in grads[1:]), local_health(grads[0])) if grads else health)

    def agree(self, health: torch.Tensor, *, compressed: bool = True) -> bool:
        """Whether every rank's gradients are finite, for steps that otherwise send nothing (4 bytes)."""
        if self._world == 1:
            return _finite(health)
        # Under FSDP the reduce-scatters filed the gradients' bytes already.
        numel = 0 if self.fsdp is not None else sum(layout.numel for layout in self._state.layouts)
        comm = self._bucket(0, numel)
        comm.record.compressed = compressed
        if self.ddp is None:  # with DDP, its hook has agreed on the health word already
            health = comm.all_reduce(health.clone())
        self.record(comm.record)
        return _finite(health)

    def all_reduce_values(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """A few numbers summed (or maxed, ``op="max"``) over ranks, e.g. per-tensor squared norms of FSDP shards."""
        if self.world == 1:
            return values
        comm = self._bucket(0, 0)
        out = values.clone()
        comm.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        self.record(comm.record)
        return out

    # -- the 1-bit exchange ------------------------------------------------------------------

    def compressed_mean(self, layout: FlatLayout, x: torch.Tensor, health: torch.Tensor) -> torch.Tensor | None:
        """The 1-bit two-phase mean of ``x`` with worker and server error feedback; None if any rank was non-finite.

        ``x`` (scratch) is overwritten. The result lives in a workspace: copy it
        before the next call. On a single rank nothing is compressed.
        """
        if self._world == 1:
            return x
        start = time.perf_counter()
        comm = self._bucket(layout.index, layout.numel)
        comm.record.compressed = True
        res = self._exchange.reduce(comm, self._codec, x, layout, health=health)
        comm.record.total_s = time.perf_counter() - start
        self.record(comm.record)
        return None if res.nonfinite else res.out

    def reset_errors(self) -> None:
        """Zero the worker and server errors (when what is compressed changes meaning)."""
        for layout in self._state.layouts:
            werr = self._state.existing(layout, "worker_error")
            if werr is not None:
                werr.zero_()
        self._exchange.zero_()

    def _worker_error(self, layout: FlatLayout) -> torch.Tensor:
        return self._state.buffer(layout, "worker_error")

    def _bucket(self, index: int, numel: int) -> Comm:
        return Comm(self.group, BucketRecord(index=index, numel=numel))


def _bucket_index(layout: FlatLayout) -> int:
    """A bucket's server error is kept by its index (its place in the checkpoint's ``buckets``)."""
    return layout.index


def _finite(health: torch.Tensor) -> bool:
    return bool(torch.isfinite(health).all())
