"""What each method sends, bucket by bucket, and what its encode/decode costs: a dry run in one process.

The real compressor runs on buckets laid out as DDP lays them out (reverse
parameter order, ``bucket_cap_mb`` each) through a :class:`SimulatedComm` that
stands for ``world_size`` ranks: every collective is recorded (operation and
bytes this rank hands it) and answered locally (an all-gather returns this
rank's tensor for every rank, as a broadcast view). So the payload comes from
the compressor's own code for the model's shapes and any world size, and the
time of the run is its encode/decode cost on this machine's CPU or GPU.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from distcomp.bucket import Bucket
from distcomp.comm import DENSE_BYTES_PER_ELEMENT, BucketRecord, Comm
from distcomp.compressor import CompressorConfig

Op = Literal["all_reduce", "all_gather", "all_to_all", "reduce_scatter"]
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Collective:
    """One collective of one bucket."""

    op: Op
    nbytes: int
    """Bytes this rank hands the collective (for an all-gather: its own contribution)."""


@dataclass(frozen=True)
class BucketTraffic:
    """One bucket: its share of the gradients and its collectives, in order."""

    numel: int
    collectives: tuple[Collective, ...]
    codec_s: float
    """Encode + decode seconds of this bucket on the device of the dry run."""


@dataclass(frozen=True)
class Traffic:
    """A step of one method: its buckets in the order backward fills them."""

    buckets: tuple[BucketTraffic, ...]
    overlap: bool = True
    """The buckets' communication runs while backward goes on (False: it starts after backward ends)."""
    sharded: bool = False
    """FSDP: each bucket is a unit whose parameter all-gathers (forward and backward) and gradient reduction
    overlap the whole forward and backward pass."""
    notes: tuple[str, ...] = ()
    """What the compressor warned about in the dry run (e.g. top-k falling back to a dense all-reduce)."""

    @property
    def codec_s(self) -> float:
        return sum(b.codec_s for b in self.buckets)

    @property
    def numel(self) -> int:
        return sum(b.numel for b in self.buckets)


@dataclass
class SimulatedComm(Comm):
    """A :class:`~distcomp.comm.Comm` for ``world_size`` ranks that records its collectives and answers them
    from this rank's data alone."""

    simulated_world: int = 2
    log: list[Collective] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._done = False
        self.world_size, self.rank = self.simulated_world, 0
        w = self.world_size
        self.record.dense_bytes = 2 * (w - 1) / w * DENSE_BYTES_PER_ELEMENT * self.record.numel

    def _log(self, op: Op, tensor: torch.Tensor) -> None:
        self.log.append(Collective(op, tensor.numel() * tensor.element_size()))

    def all_reduce(self, tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
        self._log("all_reduce", tensor)
        return tensor.mul_(self.world_size) if tensor.is_floating_point() else tensor

    def all_reduce_async(self, tensor: torch.Tensor) -> torch.futures.Future:
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(self.all_reduce(tensor))
        return fut

    def all_gather(self, tensor: torch.Tensor, *, last: bool = False) -> torch.Tensor:
        self._log("all_gather", tensor)
        return tensor.unsqueeze(0).expand(self.world_size, *tensor.shape)

    def all_to_all(self, tensor: torch.Tensor) -> torch.Tensor:
        self._log("all_to_all", tensor)
        return tensor.clone()


def ddp_buckets(shapes: Sequence[Shape], bucket_cap_mb: float) -> list[list[int]]:
    """Parameter indices per bucket as DDP fills them: reverse order, at most ``bucket_cap_mb`` of fp32 each."""
    cap = bucket_cap_mb * 2**20 / DENSE_BYTES_PER_ELEMENT
    buckets: list[list[int]] = [[]]
    size = 0
    for i in reversed(range(len(shapes))):
        n = _numel(shapes[i])
        if buckets[-1] and size + n > cap:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += n
    return buckets


def _numel(shape: Shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _bucket(shapes: Sequence[Shape], indices: Sequence[int], device: str, index: int) -> Bucket:
    g = torch.Generator(device=device).manual_seed(index)
    named = [(f"p{i}", torch.randn(shapes[i], generator=g, device=device)) for i in indices]
    return Bucket.from_tensors(named, index=index)


def dense_traffic(shapes: Sequence[Shape], bucket_cap_mb: float) -> Traffic:
    """Plain DDP: an fp32 all-reduce per bucket, no codec."""
    buckets = ddp_buckets(shapes, bucket_cap_mb)
    sizes = [sum(_numel(shapes[i]) for i in b) for b in buckets]
    return Traffic(tuple(BucketTraffic(n, (Collective("all_reduce", 4 * n),), 0.0) for n in sizes))


def compressed_traffic(
    compressor: str | CompressorConfig,
    options: dict[str, Any],
    shapes: Sequence[Shape],
    world_size: int,
    *,
    bucket_cap_mb: float,
    device: str = "cpu",
    reps: int = 3,
    overlap: bool = True,
) -> Traffic:
    """A step of ``compressor`` in its compressed phase: its collectives from a dry run, its codec cost timed.

    ``reps`` compressed steps are timed after two untimed ones (the first allocates, PowerSGD's second
    warm-starts); each bucket's median counts.
    """
    from distcomp.registry import make_compressor

    comp = make_compressor(compressor, {**options, "start_step": 0})
    layout = ddp_buckets(shapes, bucket_cap_mb)
    times: list[list[float]] = [[] for _ in layout]
    logs: list[list[Collective]] = [[] for _ in layout]
    with _warnings_kept() as notes:
        _dry_steps(comp, shapes, layout, world_size, device, reps, times, logs)
    return Traffic(
        tuple(
            BucketTraffic(sum(_numel(shapes[i]) for i in idx), tuple(log), statistics.median(t))
            for idx, log, t in zip(layout, logs, times)
        ),
        overlap=overlap,
        notes=tuple(dict.fromkeys(notes)),
    )


def _dry_steps(
    comp: Any,
    shapes: Sequence[Shape],
    layout: list[list[int]],
    world_size: int,
    device: str,
    reps: int,
    times: list[list[float]],
    logs: list[list[Collective]],
) -> None:
    for step in range(2 + reps):
        for j, indices in enumerate(layout):
            bucket = _bucket(shapes, indices, device, j)
            comm = SimulatedComm(None, BucketRecord(index=j, numel=bucket.numel), simulated_world=world_size)
            _sync(device)
            start = time.perf_counter()
            comp.reduce(bucket, comm, step, ends_step=j == len(layout) - 1)
            _sync(device)
            if step >= 2:
                times[j].append(time.perf_counter() - start)
            logs[j] = comm.log


class _Keep(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


@contextmanager
def _warnings_kept() -> Iterator[list[str]]:
    """The library's warnings during the block, kept instead of printed."""
    kept: list[str] = []
    log = logging.getLogger("distcomp")
    handlers, propagate = log.handlers, log.propagate
    log.handlers, log.propagate = [_Keep(kept)], False
    try:
        yield kept
    finally:
        log.handlers, log.propagate = handlers, propagate


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fsdp_traffic(
    compressor: str | None,
    shapes: Sequence[Shape],
    world_size: int,
    *,
    bucket_cap_mb: float,
    device: str = "cpu",
    reps: int = 3,
) -> Traffic:
    """A step of FSDP2 over units laid out like DDP's buckets: two fp32 all-gathers of each unit's parameters
    (forward, and backward after resharding) and its gradient reduce-scatter, or with ``compressor`` the
    all-to-all of its codec (phase 1 of the two-phase mean, as ``distcomp.fsdp`` sends it)."""
    units = ddp_buckets(shapes, bucket_cap_mb)
    sizes = [sum(_numel(shapes[i]) for i in u) for u in units]
    gathers = [Collective("all_gather", 4 * -(-n // world_size)) for n in sizes]
    reductions: list[tuple[Collective, ...]]
    if compressor is None:
        # gloo has no reduce-scatter of its own: torch runs it as an all-reduce (twice the bytes).
        op: Op = "all_reduce" if device == "cpu" else "reduce_scatter"
        reductions = [(Collective(op, 4 * n),) for n in sizes]
        codec = [0.0] * len(sizes)
    else:
        dry = compressed_traffic(
            compressor, {}, shapes, world_size, bucket_cap_mb=bucket_cap_mb, device=device, reps=reps
        )
        reductions = [tuple(c for c in b.collectives if c.op == "all_to_all") for b in dry.buckets]
        codec = [b.codec_s for b in dry.buckets]
    # On CPU, FSDP2 runs its collectives in line with the compute (no separate streams): nothing overlaps.
    return Traffic(
        tuple(BucketTraffic(n, (g, g, *r), k) for n, g, r, k in zip(sizes, gathers, reductions, codec)),
        overlap=device != "cpu",
        sharded=True,
    )
