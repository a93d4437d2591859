"""Blocking collectives that count what they send and how long they wait.

Every compressor talks to the network only through :class:`Comm`, so the
telemetry is the same for all of them. Bytes are reported two ways:

* ``payload_bytes``: the size of the tensors handed to collectives;
* ``sent_bytes``: what this rank puts on the wire under the bandwidth-optimal
  algorithm of each collective (ring all-reduce sends ``2 (w-1)/w`` of its
  input, all-gather ``(w-1)`` times its input, all-to-all ``(w-1)/w``). This is
  what a link counter sees, and the ratio against a dense fp32 all-reduce is
  computed from it.

A :class:`Comm` may carry a pipelined bucket's turn
(:class:`~distcomp.hooks.executor.Turn`): its last collective is then issued
asynchronously and waited for while the next bucket runs, and the schedules take
their scratch space from :meth:`Comm.scratch`, since two buckets may be in flight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from distcomp.telemetry import Counters
from distcomp.workspace import Workspace

if TYPE_CHECKING:
    from distcomp.hooks.executor import Turn

DENSE_BYTES_PER_ELEMENT = 4


@dataclass(kw_only=True)
class BucketRecord(Counters):
    """What one bucket cost in one step: its :class:`~distcomp.telemetry.Counters` and its place in the step."""

    index: int
    """Position of the bucket in this step's hook calls."""

    @property
    def total_s(self) -> float:
        """Seconds for the whole bucket (encode + communication + decode).

        Set it once the bucket is done, after its last collective: what is not
        ``comm_s`` becomes ``codec_s``.
        """
        return self.comm_s + self.codec_s

    @total_s.setter
    def total_s(self, seconds: float) -> None:
        self.codec_s = max(seconds - self.comm_s, 0.0)

    def as_dict(self) -> dict[str, Any]:
        """Plain values: the index, then the counters with ``total_s`` in place of ``codec_s``."""
        out: dict[str, Any] = {"index": self.index}
        for name, value in self.counters().items():
            if name == "codec_s":
                name, value = "total_s", self.total_s  # a bucket reports its whole time; a step, the codec part
            out[name] = value
        return out


@dataclass
class Comm:
    """Synchronous collectives on ``group``, recorded into ``record``."""

    group: dist.ProcessGroup | None
    record: BucketRecord = field(default_factory=lambda: BucketRecord(index=-1, numel=0))
    turn: Turn | None = None
    """A pipelined bucket's turn: the collective marked ``last`` hands the thread on while it runs."""

    def __post_init__(self) -> None:
        self._done = False
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        w = self.world_size
        self.record.dense_bytes = 2 * (w - 1) / w * DENSE_BYTES_PER_ELEMENT * self.record.numel

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        """Sum (or reduce with ``op``) ``tensor`` over ranks in place and return it."""
        w = self.world_size
        self._timed(tensor, 2 * (w - 1) / w, lambda: dist.all_reduce(tensor, op=op, group=self.group))
        return tensor

    def all_reduce_async(self, tensor: torch.Tensor) -> torch.futures.Future:
        """:meth:`all_reduce` (sum) without waiting: the future holds ``tensor`` once every rank's is added in.

        ``comm_s`` counts from the issue to the completion.
        """
        self._check_open()
        w, start, record = self.world_size, time.perf_counter(), self.record

        # The callback runs on a backend thread and must not hold the group (it holds only the record): a
        # group whose last reference dropped there would be destroyed on its own thread, which aborts.
        def done(fut: torch.futures.Future) -> torch.Tensor:
            fut.value()  # re-raises the collective's error
            _count(record, tensor, 2 * (w - 1) / w, time.perf_counter() - start)
            return tensor

        return dist.all_reduce(tensor, group=self.group, async_op=True).get_future().then(done)

    def all_gather(self, tensor: torch.Tensor, *, last: bool = False) -> torch.Tensor:
        """Every rank's ``tensor`` stacked along a new first dimension.

        ``last``: the bucket issues no collective after this one; with a
        :attr:`turn`, the next bucket runs while this one is on the wire.
        """
        flat = tensor.contiguous().view(-1)
        out = flat.new_empty(self.world_size * flat.numel())
        if last and self.turn is not None:
            self._check_open()
            # Counted until this bucket runs again: time the next bucket held the thread is not codec time.
            start = time.perf_counter()
            self.turn.wait(_all_gather_flat(out, flat, group=self.group, async_op=True))
            self._count(tensor, self.world_size - 1, time.perf_counter() - start)
        else:
            self._timed(tensor, self.world_size - 1, lambda: _all_gather_flat(out, flat, group=self.group))
        self._done = last
        return out.view(self.world_size, *tensor.shape)

    def all_to_all(self, tensor: torch.Tensor) -> torch.Tensor:
        """Row ``i`` of ``tensor`` (shape ``[world, ...]``) goes to rank ``i``.

        Row ``j`` of the result came from rank ``j``.
        """
        out = torch.empty_like(tensor)
        w = self.world_size
        self._timed(
            tensor,
            (w - 1) / w,
            lambda: dist.all_to_all_single(out, tensor.contiguous(), group=self.group),
        )
        return out

    def scratch(self, ws: Workspace) -> Workspace:
        """``ws``, or for a pipelined bucket the workspace of its turn (the previous bucket may still use ``ws``)."""
        return ws if self.turn is None else self.turn.workspace(ws)

    def _check_open(self) -> None:
        if self._done and self.turn is not None:
            # The next bucket may already have issued its collectives: this one would be out of order.
            raise RuntimeError("a pipelined bucket issued a collective after the one it marked last")

    def _timed(self, tensor: torch.Tensor, wire_factor: float, op) -> None:
        self._check_open()
        start = time.perf_counter()
        op()
        self._count(tensor, wire_factor, time.perf_counter() - start)

    def _count(self, tensor: torch.Tensor, wire_factor: float, seconds: float) -> None:
        _count(self.record, tensor, wire_factor, seconds)


def _count(record: BucketRecord, tensor: torch.Tensor, wire_factor: float, seconds: float) -> None:
    """Add one collective of ``tensor`` that took ``seconds`` to ``record``."""
    nbytes = tensor.numel() * tensor.element_size()
    record.comm_s += seconds
    record.payload_bytes += nbytes
    record.sent_bytes += wire_factor * nbytes
    record.collectives += 1


# torch 2.13 renamed all_gather_into_tensor to all_gather_single; older releases only have the former.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
