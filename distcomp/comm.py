"""Blocking collectives that count what they send and how long they wait.

Every compressor talks to the network only through :class:`Comm`, so the
telemetry is the same for all of them. Bytes are reported two ways:

* ``payload_bytes``: the size of the tensors handed to collectives;
* ``sent_bytes``: what this rank puts on the wire under the bandwidth-optimal
  algorithm of each collective (ring all-reduce sends ``2 (w-1)/w`` of its
  input, all-gather ``(w-1)`` times its input, all-to-all ``(w-1)/w``). This is
  what a link counter sees, and the ratio against a dense fp32 all-reduce is
  computed from it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from distcomp.telemetry import Counters

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

    def __post_init__(self) -> None:
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        w = self.world_size
        self.record.dense_bytes = 2 * (w - 1) / w * DENSE_BYTES_PER_ELEMENT * self.record.numel

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        """Sum (or reduce with ``op``) ``tensor`` over ranks in place and return it."""
        w = self.world_size
        self._timed(tensor, 2 * (w - 1) / w, lambda: dist.all_reduce(tensor, op=op, group=self.group))
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` stacked along a new first dimension."""
        flat = tensor.contiguous().view(-1)
        out = flat.new_empty(self.world_size * flat.numel())
        self._timed(
            tensor,
            self.world_size - 1,
            lambda: _all_gather_flat(out, flat, group=self.group),
        )
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

    def _timed(self, tensor: torch.Tensor, wire_factor: float, op) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        start = time.perf_counter()
        op()
        self.record.comm_s += time.perf_counter() - start
        self.record.payload_bytes += nbytes
        self.record.sent_bytes += wire_factor * nbytes
        self.record.collectives += 1


# torch 2.13 renamed all_gather_into_tensor to all_gather_single; older releases only have the former.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
