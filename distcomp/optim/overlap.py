"""The compressed phase's exchange, started from DDP's comm hook so that it overlaps the backward pass.

With ``distcomp.optim.register(ddp, opt)`` (``overlap=True``, the default), a
step whose 1-bit exchange needs nothing but this rank's gradient (1-bit Adam's
and 1-bit LAMB's compressed phase, 0/1 Adam's 1-bit gradient steps and its
synchronisations) runs that exchange during backward:

* DDP hands the comm hook its buckets in order; the hook copies each bucket's
  gradients into the optimizer's fused buckets (the unit of the exchange,
  unchanged, so checkpoints and results are those of the step-time path) and,
  once a fused bucket has all its gradients, the communication worker computes
  this rank's momentum and runs the bucket's two-phase exchange;
* ``step()`` then only applies the averaged momenta.

Nothing the optimizer keeps changes before ``step()``: the new worker errors
and server errors wait in scratch (:class:`StagedWorkerErrors`, a staged
:class:`~distcomp.exchange.TwoPhaseExchange`) and the means in the gradient
scratch, so a step that is non-finite on any rank is dropped as a whole, and a
checkpoint taken between backward and step is the state before the step.

The exchange used the gradients as backward left them, with the hyperparameters
of that moment. ``step()`` checks both: if a GradScaler unscales the gradients in
the step, if they were changed in place (clipping) or replaced, or if a
hyperparameter changed in between, the prepared exchange is dropped, the step
runs the step-time path (same result) and the overlap stays off from then on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from distcomp.comm import BucketRecord, Comm
from distcomp.exchange import TwoPhaseExchange
from distcomp.hooks.executor import WorkerExecutor
from distcomp.numerics import l2_norm, local_health
from distcomp.optim.layout import FlatLayout
from distcomp.optim.state import FlatState
from distcomp.workspace import Workspace

if TYPE_CHECKING:
    from distcomp.optim.base import CompressedOptimizer

logger = logging.getLogger("distcomp.optim")

_SCALED = "a GradScaler drives the steps, and the gradients are only unscaled in step()"


class StagedWorkerErrors:
    """Worker errors of an exchange that runs before its step is known finite everywhere.

    The exchange reads and renews a scratch copy of each bucket's error; the
    copies replace the optimizer's errors at ``end_step(keep=True)``. The
    arithmetic is that of :class:`~distcomp.exchange.ImmediateResiduals`.
    """

    def __init__(self, state: FlatState) -> None:
        self._state = state
        self._ws = Workspace()
        self._kept: dict[int, FlatLayout] = {}

    def _scratch(self, layout: FlatLayout) -> torch.Tensor:
        return self._ws.get(f"error{layout.index}", layout.numel, torch.float32, layout.device)

    def residual(self, layout: FlatLayout) -> torch.Tensor:
        """A copy of the bucket's worker error (zeros before its first exchange), renewed in place by the exchange."""
        scratch = self._scratch(layout)
        current = self._state.existing(layout, "worker_error")
        return scratch.zero_() if current is None else scratch.copy_(current)

    def next_residual(self, layout: FlatLayout) -> None:
        """None: the exchange renews :meth:`residual` itself."""
        return None

    def stage(self, layout: FlatLayout) -> float:
        """The bucket's renewed error is kept at :meth:`end_step`; returns its L2 norm."""
        self._kept[layout.index] = layout
        return l2_norm(self._scratch(layout))

    def end_step(self, keep: bool) -> None:
        """Copy the renewed errors into the optimizer's state (``keep``), or forget them."""
        if keep:
            for layout in self._kept.values():
                self._state.buffer(layout, "worker_error").copy_(self._scratch(layout))
        self._kept.clear()


@dataclass
class _Backward:
    """What one backward pass has exchanged so far for optimizer step ``step``."""

    step: int
    waiting: list[int]
    """Gradients each fused bucket still waits for."""
    groups: list[dict[str, Any]]
    """The hyperparameters the exchange used."""
    means: list[torch.Tensor | None] = field(default_factory=list)
    nonfinite: bool = False
    grads: list[tuple[torch.Tensor, torch.Tensor | None, int]] | None = None
    """``(parameter, its .grad, the grad's version)`` once DDP has written the gradients back."""
    problem: str = ""
    """Why the exchange cannot stand for the step, if it cannot."""


@dataclass(frozen=True)
class Exchanged:
    """The outcome of a step's overlapped exchange: the averaged bucket values, or a non-finite step."""

    finite: bool
    means: list[torch.Tensor]


class BackwardExchange:
    """Runs a compressed optimizer's 1-bit exchange from DDP's comm hook, bucket by bucket, on ``executor``.

    ``executor`` owns the process group the exchange talks on (see
    :mod:`distcomp.hooks.executor`). Not checkpointed: between steps it holds
    nothing, and during one only scratch (see the module docstring).
    """

    def __init__(self, optimizer: CompressedOptimizer, executor: WorkerExecutor) -> None:
        self.optimizer = optimizer
        self.executor = executor
        self.enabled = True
        """Whether backward passes still exchange; a step that had to fall back turns it off for good."""
        self.steps_overlapped = 0
        """Steps whose exchange ran during backward."""
        comm = optimizer.comm
        self._exchange: TwoPhaseExchange[FlatLayout] = TwoPhaseExchange(
            optimizer.algorithm,
            lambda layout: layout.index,
            StagedWorkerErrors(optimizer.flat),
            staged=True,
            server=optimizer.flat.server,
        )
        self._exchange.ws = comm.exchange_workspace  # one bucket at a time, never both paths at once
        self._where: dict[int, tuple[int, int]] | None = None
        self._pending: _Backward | None = None

    # -- the hook side (autograd thread, then the worker) -------------------------------------

    def wants(self, step: int) -> bool:
        """Whether the backward pass for optimizer step ``step`` runs the step's exchange."""
        opt = self.optimizer
        return self.enabled and opt.comm.connected and opt._overlaps(step)

    def on_bucket(self, bucket: dist.GradBucket, step: int) -> torch.futures.Future:
        """Hand DDP bucket ``bucket``'s gradients to the worker; fused buckets that fill up are exchanged there."""
        called = time.perf_counter()
        if bucket.index() == 0:
            self._begin(step)
        pending = self._pending
        assert pending is not None
        buffer, last = bucket.buffer(), bucket.is_last()
        pairs = list(zip(bucket.parameters(), bucket.gradients()))

        def job(_turn: object = None) -> torch.Tensor:
            records = self._receive(pending, pairs)
            if last:
                if any(pending.waiting):
                    pending.problem = "some of the optimizer's gradients did not arrive through DDP's buckets"
                if records:  # backward has nothing left to overlap with from its last hook call on
                    records[-1].exposed_comm_s = time.perf_counter() - called
                if pending.nonfinite:  # every rank's scaler sees it, as with the step-time path's hook
                    buffer.fill_(float("nan"))
            for rec in records:
                self.optimizer.comm.record(rec)
            return buffer

        return self.executor.submit(job, data=buffer)

    def _begin(self, step: int) -> None:
        """The first bucket of a backward pass (a second backward before ``step()`` starts over)."""
        layouts = self.optimizer.flat.layouts
        if self._where is None:
            self._where = {id(p): (i, k) for i, layout in enumerate(layouts) for k, p in enumerate(layout.owners)}
        if self._pending is not None:
            self._exchange.end_step(False)
        self._exchange.begin_step()
        pending = _Backward(
            step, [len(layout.owners) for layout in layouts], _hyperparameters(self.optimizer), [None] * len(layouts)
        )
        self._pending = pending
        # DDP writes the averaged buckets back into .grad in a callback queued during backward; queueing
        # from inside a callback runs after every callback queued so far, so after DDP's.
        engine = torch.autograd.Variable._execution_engine
        engine.queue_callback(lambda: engine.queue_callback(lambda: self._note_grads(pending)))

    def _receive(self, pending: _Backward, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[BucketRecord]:
        """Copy a DDP bucket's gradients into the fused buckets; exchange each fused bucket that is complete."""
        assert self._where is not None
        layouts = self.optimizer.flat.layouts
        records = []
        for p, grad in pairs:
            where = self._where.get(id(p))
            if where is None:
                continue
            i, k = where
            layout = layouts[i]
            if grad.dtype != p.dtype:
                pending.problem = f"DDP's bucket holds {grad.dtype} gradients for {p.dtype} parameters"
            flat = self.optimizer.comm.grad_buffer(layout)
            offset = layout.offsets[k]
            flat[offset : offset + p.numel()].view(p.shape).copy_(grad)
            pending.waiting[i] -= 1
            if pending.waiting[i] == 0:
                records.append(self._exchange_bucket(pending, layout, flat))
        return records

    def _exchange_bucket(self, pending: _Backward, layout: FlatLayout, g: torch.Tensor) -> BucketRecord:
        """This rank's value of the bucket, then the two-phase mean; the mean goes back into ``g``."""
        opt = self.optimizer
        start = time.perf_counter()
        health = local_health(g)
        local = opt._exchange_value(pending.step, layout, g)
        comm = Comm(self.executor.group, BucketRecord(index=layout.index, numel=layout.numel, compressed=True))
        res = self._exchange.reduce(comm, opt.comm.codec, local, layout, health=health)
        if res.nonfinite:
            pending.nonfinite = True
        else:
            g.copy_(res.out)  # the exchange is done with its input: the mean waits there for step()
            pending.means[layout.index] = g
        comm.record.total_s = time.perf_counter() - start
        return comm.record

    def _note_grads(self, pending: _Backward) -> None:
        pending.grads = [
            (p, p.grad, -1 if p.grad is None else p.grad._version)
            for layout in self.optimizer.flat.layouts
            for p in layout.owners
        ]

    # -- the step side ------------------------------------------------------------------------

    def take(self, step: int) -> Exchanged | None:
        """The exchange prepared for ``step``, now made current; None: the step runs the step-time path.

        A non-finite step's exchange is dropped (``finite=False``).
        """
        pending, self._pending = self._pending, None
        if pending is None or pending.step != step:
            if pending is not None:
                self._exchange.end_step(False)
            if self.enabled and getattr(self.optimizer, "grad_scale", None) is not None:  # known before it costs
                self._turn_off(_SCALED)
            return None
        problem = pending.problem or self._changed(pending)
        if problem:
            self._exchange.end_step(False)
            self._turn_off(problem)
            return None
        finite = not pending.nonfinite
        self._exchange.end_step(finite)
        self.steps_overlapped += 1
        return Exchanged(finite, [m for m in pending.means if m is not None] if finite else [])

    def _turn_off(self, problem: str) -> None:
        self.enabled = False
        logger.warning(
            "%s: the compressed exchange does not overlap the backward pass: %s. It runs in step() from now on, "
            "with the same results; pass overlap=False to distcomp.optim.register to say so",
            self.optimizer.algorithm,
            problem,
        )

    def forget_layout(self) -> None:
        """The optimizer's fused buckets were rebuilt (a checkpoint's layout, before any step)."""
        self.drop()
        self._where = None

    def drop(self) -> None:
        """Forget a prepared exchange (the optimizer's state is being replaced)."""
        if self._pending is not None:
            self._pending = None
            self._exchange.end_step(False)

    def _changed(self, pending: _Backward) -> str:
        """What happened between backward and ``step()`` that the exchange did not see, if anything."""
        opt = self.optimizer
        if getattr(opt, "grad_scale", None) is not None:
            return _SCALED
        if not pending.nonfinite and any(m is None for m in pending.means):
            return "not every bucket was exchanged"
        if pending.grads is None:
            return "the backward pass ended without DDP writing the gradients back"
        for p, grad, version in pending.grads:
            if p.grad is not grad or (grad is not None and grad._version != version):
                return "the gradients were changed between backward and step() (e.g. clipped or unscaled)"
        if _hyperparameters(opt) != pending.groups:
            return "the hyperparameters were changed between backward and step()"
        return ""

    def close(self) -> None:
        """Stop the worker and destroy its process group (idempotent)."""
        self.executor.shutdown()


def _hyperparameters(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
