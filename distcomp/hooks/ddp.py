"""DDP comm hooks: ``distcomp.register(ddp_model, "powersgd", rank=4)``.

DDP calls the hook once per bucket, in the same order on every rank. The hook
turns torch's ``GradBucket`` into a :class:`~distcomp.bucket.Bucket` keyed by
parameter names (DDP rebuilds buckets after the first step, so bucket indices
are not stable) and hands it to the compressor through an executor that issues
all collectives from one place.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from distcomp.agreement import check_agreement
from distcomp.bucket import Bucket
from distcomp.checkpoint import attach
from distcomp.collectives import exact_mean_async
from distcomp.comm import BucketRecord, Comm
from distcomp.compressor import Compressor
from distcomp.compressors.none import NoCompression
from distcomp.compressors.twophase import TwoPhaseCompressor
from distcomp.config import config_to_dict
from distcomp.hooks.executor import InlineExecutor, PipelinedExecutor, Turn, WorkerExecutor
from distcomp.rankstate import check_rank_state
from distcomp.registry import make_compressor
from distcomp.streams import new_future
from distcomp.telemetry import Telemetry

STATE_FORMAT = "distcomp.compression/1"
logger = logging.getLogger("distcomp")


class CompressionState:
    """The state a distcomp DDP comm hook carries: compressor, step counter, telemetry.

    Checkpointing: :meth:`state_dict` holds this rank's compressor state (residuals
    differ per rank: save one file per rank), the step, and the config, world size
    and rank it was made with; never the process group.
    """

    def __init__(
        self,
        compressor: Compressor,
        *,
        group: dist.ProcessGroup | None = None,
        param_names: dict[int, str] | None = None,
        overlap: bool = True,
        pipeline: bool = True,
        log_every: int = 0,
        timeout: datetime.timedelta | None = None,
    ) -> None:
        self.compressor = compressor
        self.group = group
        self.overlap = overlap
        self.step = 0
        self.restored = False
        """Whether a checkpoint's state was loaded (a resumed run that did not is warned, see distcomp.checkpoint)."""
        self.telemetry = Telemetry(log_every=log_every)
        self._names = dict(param_names or {})
        self._name_from_order = param_names is None
        self._bucket_in_step = 0
        self._layouts: list[tuple[str, ...]] = []
        self._step_layouts: list[tuple[str, ...]] = []
        self._restored: dict[tuple[str, ...], None] = {}
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._executor: InlineExecutor | WorkerExecutor | PipelinedExecutor = InlineExecutor(group)
        # `none` with overlap issues DDP's own all-reduce straight from the hook, as DDP does (see _exact_async).
        self._direct = overlap and type(compressor) is NoCompression
        self._step_futures: list[tuple[torch.futures.Future, BucketRecord]] = []
        if overlap:
            ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
            # The worker's own group must time out like the job's, not after torch's 30-minute default.
            # Only the worker holds it, so that shutting the worker down destroys it (see executor.py).
            worker_group = dist.new_group(ranks=ranks, timeout=timeout or group_timeout(group))
            # Two-phase buckets end with an all-gather that the next bucket's all-to-all can overlap.
            pipelined = pipeline and isinstance(compressor, TwoPhaseCompressor)
            self._executor = (PipelinedExecutor if pipelined else WorkerExecutor)(worker_group)

    @property
    def _comm_group(self) -> dist.ProcessGroup | None:
        """The group the compressor's collectives run on: the worker's own, or ``group`` inline."""
        return self._executor.group

    # -- the hook ---------------------------------------------------------------

    def on_bucket(self, grad_bucket: dist.GradBucket) -> torch.futures.Future:
        """Compress and average one DDP bucket; returns the future DDP waits on."""
        called = time.perf_counter()
        bucket = self._bucket(grad_bucket)
        step, last = self.step, grad_bucket.is_last()
        units = self._units(bucket, step)
        self._bucket_in_step = 0 if last else self._bucket_in_step + 1
        if last:
            self.step += 1
            self._layouts, self._step_layouts = self._step_layouts or self._layouts, []
        if self._direct:
            return self._exact_async(bucket, step, last, called)

        def job(turn: Turn | None) -> torch.Tensor:
            out = bucket.buffer
            for unit in units:
                comm = Comm(self._comm_group, BucketRecord(index=unit.index, numel=unit.numel), turn)
                # The step's state is kept or dropped as a whole after its last bucket (see Compressor.reduce).
                ends_step = last and unit is units[-1]
                try:
                    out = self.compressor.reduce(unit, comm, step, ends_step=ends_step)
                finally:
                    if ends_step:  # backward has nothing left to overlap with from its last hook call on
                        comm.record.exposed_comm_s = time.perf_counter() - called
                    self.telemetry.add(step, comm.record)
                if unit is not bucket:
                    for (_, dst), (_, src) in zip(bucket.select(unit.names), unit.views(out)):
                        dst.copy_(src)
                    out = bucket.buffer
            if last:
                self.telemetry.end_step()
            return out

        # Only a bucket that ends in one compressed two-phase exchange has a last collective to overlap.
        pipelined = len(units) == 1 and step >= self.compressor.config.start_step and bucket.numel > 0
        return self._executor.submit(job, pipelined=pipelined, data=bucket.buffer)

    def _exact_async(self, bucket: Bucket, step: int, last: bool, called: float) -> torch.futures.Future:
        """``none``: DDP's all-reduce issued from the hook on the worker's group, without the worker thread.

        A thread hand-off per bucket is what made ``none`` slower than DDP on a
        busy machine; issuing from the hook is safe because DDP calls it in the same
        bucket order on every rank, and the callbacks issue no collective. The
        step's records are added once all its buckets are done (callbacks may
        finish out of order).
        """
        start = time.perf_counter()
        rec = BucketRecord(index=bucket.index, numel=bucket.numel)
        rec.compressed = step >= self.compressor.config.start_step

        def timed(fut: torch.futures.Future) -> torch.Tensor:
            rec.total_s = time.perf_counter() - start
            return fut.value()

        fut = exact_mean_async(bucket.buffer, Comm(self._comm_group, rec)).then(timed)
        self._step_futures.append((fut, rec))
        if not last:
            return fut
        pending, self._step_futures = self._step_futures, []
        # collect_all's future carries no device, nor would a .then() of it: the last bucket's result goes
        # through a future of its own that does, completed after this thread's stream waited for every bucket.
        out = new_future(bucket.buffer)

        def close(done: torch.futures.Future) -> None:
            rec.exposed_comm_s = time.perf_counter() - called
            error: BaseException | None = None
            try:
                for f in done.value():
                    f.wait()  # re-raises a bucket's error; on CUDA, the current stream waits for the bucket's
            except BaseException as exc:  # noqa: BLE001 - DDP re-raises it from backward()
                error = exc
            for _, r in pending:  # the step's statistics are complete before backward returns
                self.telemetry.add(step, r)
            self.telemetry.end_step()
            if error is None:
                out.set_result(fut.value())
            else:
                out.set_exception(error)

        torch.futures.collect_all([f for f, _ in pending]).then(close)
        return out

    def _units(self, bucket: Bucket, step: int) -> list[Bucket]:
        """The pieces to compress: the bucket itself, or the layouts a resumed checkpoint recorded.

        A fresh DDP starts with its initial buckets and rebuilds them after one
        step. A run resumed mid-compression would therefore compress its first
        step over different buckets than the run it continues; splitting along
        the saved layouts keeps the resumed trajectory identical.
        """
        units = [bucket]
        if self._restored and bucket.key not in self._restored:
            names = set(bucket.names)
            parts = [layout for layout in self._restored if names.issuperset(layout)]
            if sum(len(p) for p in parts) == len(names):
                units = [bucket.subset(layout, index=bucket.index) for layout in parts]
            else:
                logger.info("bucket layout differs from the checkpoint's; compressing it as it is")
        if step >= self.compressor.config.start_step:
            self._step_layouts.extend(u.key for u in units)
        return units

    def _bucket(self, grad_bucket: dist.GradBucket) -> Bucket:
        buffer = grad_bucket.buffer()
        params = grad_bucket.parameters()
        grads = grad_bucket.gradients()
        base, size = buffer.data_ptr(), buffer.element_size()
        offsets = tuple((g.data_ptr() - base) // size for g in grads)
        names = tuple(self._name(p) for p in params)
        return Bucket(buffer, names, tuple(p.shape for p in params), offsets, self._bucket_in_step)

    def _name(self, param: torch.Tensor) -> str:
        name = self._names.get(id(param))
        if name is None:
            if not self._name_from_order:
                raise KeyError("a DDP bucket holds a parameter that is not in the model given to distcomp")
            # Without the model, parameters are named by first appearance, which is
            # the same on every rank and in every run (DDP's initial bucket order).
            name = f"param{len(self._names)}"
            self._names[id(param)] = name
        return name

    # -- telemetry, checkpoints, lifetime ----------------------------------------

    def stats(self) -> dict[str, Any]:
        """Last step and cumulative: dense vs sent bytes, ratio, codec and communication time, residual norm."""
        return self.telemetry.summary()

    def state_dict(self) -> dict[str, Any]:
        """This rank's state (tensors and plain values; loadable with ``torch.load(weights_only=True)``)."""
        return {
            "format": STATE_FORMAT,
            "config": config_to_dict(self.compressor.config),
            "world_size": self.world_size,
            "rank": self.rank,
            "step": self.step,
            "layouts": [list(layout) for layout in self._layouts],
            "compressor": self.compressor.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a different config, world size or rank is a :class:`CheckpointError`."""
        check_rank_state(
            state,
            fmt=STATE_FORMAT,
            what="compression",
            config=config_to_dict(self.compressor.config),
            world={"world_size": self.world_size},
            rank=self.rank,
            world_fix="resume with the same world size",
        )
        self.compressor.load_state_dict(state["compressor"])
        self.step = int(state["step"])
        self._layouts = [tuple(layout) for layout in state.get("layouts", [])]
        self._restored = dict.fromkeys(self._layouts)
        self.restored = True

    def close(self) -> None:
        """Stop the communication worker (pending buckets finish first), then destroy its process group.

        Idempotent, and safe after ``dist.destroy_process_group()``. A worker
        left running is shut down at interpreter exit, so a script need not call this.
        """
        self._executor.shutdown()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("group", "_comm_group", "_executor"):
            state.pop(key, None)
        return state


def group_timeout(group: dist.ProcessGroup | None) -> datetime.timedelta | None:
    """The collective timeout ``group`` was created with, or None where torch does not expose it."""
    pg = group if group is not None else dist.group.WORLD
    if pg is None:  # no default group (not initialized, or destroyed): no timeout to read
        return None
    for device in ("cuda", "cpu"):
        try:
            return pg._get_backend(torch.device(device)).options._timeout
        except (RuntimeError, AttributeError):
            continue
    return None


def annotate_hook(hook: Callable[..., Any], state_type: type) -> None:
    """Give a comm hook the annotations DDP checks, as objects.

    DDP validates the hook's annotations as objects; postponed (string)
    annotations, which ``from __future__ import annotations`` makes, fail that check.
    """
    hook.__annotations__ = {
        "state": state_type,
        "bucket": dist.GradBucket,
        "return": torch.futures.Future[torch.Tensor],
    }


def compressed_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future:
    """The DDP comm hook function: ``model.register_comm_hook(state, compressed_hook)``."""
    return state.on_bucket(bucket)


annotate_hook(compressed_hook, CompressionState)


def ddp_comm_hook(
    compressor: str | Any,
    /,
    *,
    model: torch.nn.Module | None = None,
    group: dist.ProcessGroup | None = None,
    overlap: bool = True,
    pipeline: bool = True,
    log_every: int = 0,
    timeout: datetime.timedelta | None = None,
    **config: Any,
) -> tuple[Callable[[CompressionState, dist.GradBucket], torch.futures.Future], CompressionState]:
    """``(hook, state)`` for ``ddp_model.register_comm_hook(state, hook)``; call it on every rank.

    ``compressor`` is a registered name (with its options as keyword arguments) or
    a compressor ``Config``. ``model`` (the DDP model or the module inside it)
    gives parameter names for checkpoints; without it parameters are named by
    order. ``overlap`` runs communication on a worker thread so it overlaps the
    backward pass; that thread uses a process group of its own, with ``timeout``
    (default: the timeout of ``group``). ``pipeline`` (with ``overlap``, for the
    two-phase compressors sign, int8 and int4) lets bucket i+1's all-to-all start
    while bucket i's all-gather runs; the collectives and results are the same.
    Raises :class:`~distcomp.errors.RankMismatchError` on every rank if the ranks
    were given different settings.
    """
    comp = make_compressor(compressor, config)
    group = group if group is not None else getattr(model, "process_group", None)
    check_agreement({**config_to_dict(comp.config), "overlap": overlap}, group)
    names = None
    if model is not None:
        module = model.module if isinstance(model, DistributedDataParallel) else model
        names = {id(p): n for n, p in module.named_parameters()}
    state = CompressionState(
        comp,
        group=group,
        param_names=names,
        overlap=overlap,
        pipeline=pipeline,
        log_every=log_every,
        timeout=timeout,
    )
    return compressed_hook, state


def register(
    model: DistributedDataParallel,
    compressor: str | Any,
    /,
    *,
    overlap: bool = True,
    pipeline: bool = True,
    log_every: int = 0,
    timeout: datetime.timedelta | None = None,
    **config: Any,
) -> CompressionState:
    """Compress ``model``'s gradient all-reduce: ``state = distcomp.register(ddp, "powersgd", rank=4)``."""
    if not isinstance(model, DistributedDataParallel):
        raise TypeError(
            f"distcomp.register expects a DistributedDataParallel model, got {type(model).__name__}; "
            "wrap it first (DDP(model)), or use distcomp.fsdp.register for FSDP"
        )
    hook, state = ddp_comm_hook(
        compressor,
        model=model,
        group=model.process_group,
        overlap=overlap,
        pipeline=pipeline,
        log_every=log_every,
        timeout=timeout,
        **config,
    )
    model.register_comm_hook(state, hook)
    attach(model, state)  # for distcomp.state_dict(model) and the resumed-without-state warning
    return state
