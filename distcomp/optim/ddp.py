"""DDP with a compressed optimizer: one line, and nothing is communicated twice.

    ddp = DistributedDataParallel(model)
    opt = distcomp.optim.OneBitAdam(ddp.parameters(), lr=1e-3, freeze_step=400)
    distcomp.optim.register(ddp, opt)

The hook asks the optimizer, at every backward pass, what its coming step needs:

* ``"mean"`` (warm-up, 0/1 Adam's variance steps): DDP's own all-reduce
  (divide first, then sum; asynchronous, so it overlaps the backward pass);
* ``"local"`` (the optimizer communicates compressed momentum itself, or takes
  a local step): the gradients stay local. Only a 4-byte health word is
  all-reduced on the last bucket and, if any rank's gradient was non-finite,
  that bucket is filled with NaN on every rank, so that every rank's
  GradScaler skips the step and backs off alike;
* with ``overlap`` (the default), a step whose 1-bit exchange needs only this
  rank's gradient runs that exchange from the hook, bucket by bucket on a
  communication worker, while backward goes on (:mod:`distcomp.optim.overlap`);
  the gradients stay local, and the exchanges' health words decide the NaN.

Bytes go into the optimizer's telemetry (``opt.stats()``). The hook reaches the
optimizer only through its public ``steps``, ``gradient_mode`` and ``comm``
(:class:`~distcomp.optim.comm.GradientComm`: ``connected``, ``attach_ddp``,
``record``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from distcomp.agreement import check_agreement
from distcomp.comm import BucketRecord, Comm
from distcomp.hooks.ddp import annotate_hook, group_timeout
from distcomp.hooks.executor import WorkerExecutor
from distcomp.numerics import local_health
from distcomp.optim.base import CompressedOptimizer
from distcomp.optim.overlap import BackwardExchange
from distcomp.streams import new_future

logger = logging.getLogger("distcomp.optim")


class OptimizerHookState:
    """State of the hook: the optimizer it serves and the last step it delivered gradients for.

    Not checkpointed: everything it decides follows from the optimizer's step counter.
    """

    def __init__(
        self, optimizer: CompressedOptimizer, group: dist.ProcessGroup | None, overlap: BackwardExchange | None = None
    ) -> None:
        self.optimizer = optimizer
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.served_step: int | None = None
        self.overlap = overlap
        """The exchanges run during backward (None: every exchange runs in ``step()``)."""
        self._health: torch.Tensor | None = None

    def on_bucket(self, bucket: dist.GradBucket) -> torch.futures.Future:
        step = self.optimizer.steps
        buffer = bucket.buffer()
        if self.optimizer.gradient_mode(step) == "mean":
            fut = self._mean(buffer, bucket.index())
        elif self.overlap is not None and self.overlap.wants(step):
            fut = self.overlap.on_bucket(bucket, step)
        else:
            fut = self._local(buffer, bucket.index(), bucket.is_last())
        if bucket.is_last():
            self.served_step = step
        return fut

    def check_served(self, step: int) -> None:
        """Raise unless the last backward pass went through this hook for optimizer step ``step``."""
        if self.served_step != step:
            raise RuntimeError(
                f"{self.optimizer.algorithm}: step {step} was called but DDP's backward pass did not go through "
                "distcomp's hook for it (last served: "
                f"{self.served_step}); run backward on the DDP model (the last micro-batch outside no_sync()) "
                "before every optimizer step"
            )

    def _mean(self, buffer: torch.Tensor, index: int) -> torch.futures.Future:
        rec = BucketRecord(index=index, numel=buffer.numel())
        Comm(self.group, rec)  # fills in the dense bytes
        nbytes = buffer.numel() * buffer.element_size()
        rec.payload_bytes, rec.collectives = nbytes, 1
        rec.sent_bytes = 2 * (self.world_size - 1) / self.world_size * nbytes  # ring all-reduce
        start = time.perf_counter()
        buffer.div_(self.world_size)  # divide first, like DDP (keeps fp16 from overflowing)
        fut = dist.all_reduce(buffer, group=self.group, async_op=True).get_future()

        def done(f: torch.futures.Future) -> torch.Tensor:
            rec.comm_s = rec.total_s = time.perf_counter() - start
            self.optimizer.comm.record(rec)
            return f.value()[0]

        return fut.then(done)

    def _local(self, buffer: torch.Tensor, index: int, last: bool) -> torch.futures.Future:
        health = local_health(buffer)
        self._health = health if self._health is None else self._health + health
        rec = BucketRecord(index=index, numel=0, compressed=True)
        if last:
            word, self._health = self._health, None
            comm = Comm(self.group, rec)
            comm.all_reduce(word)
            if not bool(torch.isfinite(word).all()):
                buffer.fill_(float("nan"))
        self.optimizer.comm.record(rec)
        fut = new_future(buffer)  # completed on the caller's stream, which produced the buffer
        fut.set_result(buffer)
        return fut

    def close(self) -> None:
        """Stop the communication worker of the overlapped exchange and destroy its group (idempotent).

        A worker left running is shut down at interpreter exit, so a script need not call this.
        """
        if self.overlap is not None:
            self.overlap.close()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("group", "optimizer", "_health", "overlap")}


def optimizer_hook(state: OptimizerHookState, bucket: dist.GradBucket) -> torch.futures.Future:
    """The DDP comm hook: exact all-reduce or local gradients, as the optimizer's next step needs."""
    return state.on_bucket(bucket)


annotate_hook(optimizer_hook, OptimizerHookState)


def register(model: Any, optimizer: CompressedOptimizer, *, overlap: bool = True, **options: Any) -> Any:
    """Let ``optimizer`` decide the wrapper's gradient communication: ``distcomp.optim.register(model, opt)``.

    Call it on every rank, after building both and before the first step. DDP
    then all-reduces only for the steps that need the exact mean and leaves the
    gradients local when the optimizer compresses (nothing is sent twice); with
    ``overlap``, the compressed exchange runs during backward on a worker thread
    with a process group of its own, with the same results
    (:mod:`distcomp.optim.overlap`). A ``fully_shard`` (FSDP2) model
    reduce-scatters exactly for those steps and otherwise sends the 1-bit code
    of each rank's gradient in its reduce-scatter, which always overlaps backward
    (:mod:`distcomp.optim.fsdp`; ``options``: ``error_feedback``).
    """
    if isinstance(model, FSDPModule):
        from distcomp.optim.fsdp import register_fsdp

        return register_fsdp(cast(nn.Module, model), optimizer, **options)
    if options:
        raise TypeError(f"distcomp.optim.register: {sorted(options)} apply to FSDP models only")
    if not isinstance(model, DistributedDataParallel):
        raise TypeError(
            "distcomp.optim.register expects a DistributedDataParallel or fully_shard model, "
            f"got {type(model).__name__}"
        )
    if not isinstance(optimizer, CompressedOptimizer):
        raise TypeError(f"distcomp.optim.register expects a distcomp.optim optimizer, got {type(optimizer).__name__}")
    # A checkpoint loaded first (nanoGPT's order) is fine: what cannot change is a world fixed by a step.
    if optimizer.comm.connected:
        raise RuntimeError("distcomp.optim.register must be called before the optimizer's first step in this process")
    module_params = {id(p) for p in model.module.parameters()}
    if any(id(p) not in module_params for g in optimizer.param_groups for p in g["params"]):
        raise ValueError(
            "the optimizer holds parameters that are not in the DDP model; register it with the model "
            "whose gradients it consumes"
        )
    group = model.process_group
    mine, theirs = optimizer.world_size, dist.get_world_size(group)
    if mine != theirs:
        raise ValueError(f"the optimizer's process group has {mine} ranks but the DDP model's has {theirs}")
    check_agreement({"overlap": overlap}, group, what=f"{optimizer.algorithm} registration")
    # The fused bucket is the unit that overlaps backward: as fine as DDP's buckets unless the user chose one.
    optimizer.set_default_bucket_cap(model.bucket_bytes_cap / 2**20)
    exchange = None
    # One rank sends nothing and compresses nothing (the step averages exactly): no exchange to overlap.
    if overlap and theirs > 1 and _covers(model, optimizer):
        # The worker's own group, so that its collectives never interleave with DDP's differently on different ranks.
        ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
        worker = WorkerExecutor(dist.new_group(ranks=ranks, timeout=group_timeout(group)), name="distcomp-optim")
        exchange = BackwardExchange(optimizer, worker)
    state = OptimizerHookState(optimizer, group, exchange)
    model.register_comm_hook(state, optimizer_hook)
    optimizer.comm.attach_ddp(state, exchange)
    return state


def _covers(model: DistributedDataParallel, optimizer: CompressedOptimizer) -> bool:
    """Whether DDP's buckets carry exactly the optimizer's gradients (else the exchange runs in ``step()``)."""
    ignored: set[str] = getattr(model, "parameters_to_ignore", set())
    reduced = {id(p) for n, p in model.module.named_parameters() if p.requires_grad and p.numel() and n not in ignored}
    held = {id(p) for layout in optimizer.flat.layouts for p in layout.owners}
    if reduced != held:
        logger.info(
            "%s: the exchange runs in step(), not during backward: DDP reduces other parameters than the "
            "optimizer holds",
            optimizer.algorithm,
        )
        return False
    return True
