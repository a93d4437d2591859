"""What communication cost, as counters that add up, and the per-step bookkeeping of hooks, FSDP and optimizers.

:class:`Counters` is the one record of cost: a bucket's (:class:`~distcomp.comm.BucketRecord`),
a step's (:class:`StepStats`), a training step's (``distcomp.train``) all extend it
and sum with :meth:`Counters.add`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distcomp.comm import BucketRecord

logger = logging.getLogger("distcomp")


@dataclass(kw_only=True)
class Counters:
    """Bytes, collectives and seconds of communication, summed over buckets and steps with :meth:`add`."""

    numel: int = 0
    """Gradient elements communicated."""
    dense_bytes: float = 0.0
    """Bytes an fp32 ring all-reduce of the same elements would send from this rank."""
    payload_bytes: int = 0
    """Bytes of the tensors handed to collectives."""
    sent_bytes: float = 0.0
    """Bytes this rank sends under the bandwidth-optimal algorithm of each collective."""
    collectives: int = 0
    """Number of collectives issued."""
    comm_s: float = 0.0
    """Seconds spent waiting in collectives."""
    codec_s: float = 0.0
    """Seconds outside collectives: encoding, decoding, error feedback."""
    exposed_comm_s: float = 0.0
    """Seconds from the last hook call of a backward pass until its communication was done: the part of
    a step's communication that could not overlap with backward (set on the bucket that ends the step)."""
    residual_norm: float = 0.0
    """L2 norm of the error-feedback residual after this step (0 without error feedback)."""
    nonfinite: bool = False
    """True when some rank's gradient held an inf or a NaN."""
    compressed: bool = False
    """False while the compressor is still in its uncompressed warm-up."""

    @property
    def ratio(self) -> float:
        """Dense fp32 all-reduce bytes over bytes actually sent (``inf`` when nothing was sent)."""
        return self.dense_bytes / self.sent_bytes if self.sent_bytes else float("inf")

    def add(self, other: Counters) -> None:
        """Add ``other``'s counts to these, in place."""
        self.numel += other.numel
        self.dense_bytes += other.dense_bytes
        self.payload_bytes += other.payload_bytes
        self.sent_bytes += other.sent_bytes
        self.collectives += other.collectives
        self.comm_s += other.comm_s
        self.codec_s += other.codec_s
        self.exposed_comm_s += other.exposed_comm_s
        # Norms of disjoint pieces add in squares (hypot: no overflow, and exact when one side is 0).
        self.residual_norm = math.hypot(self.residual_norm, other.residual_norm)
        self.nonfinite |= other.nonfinite
        self.compressed |= other.compressed

    def __add__(self, other: Counters) -> Counters:
        """The sum as plain :class:`Counters` (so ``sum(records, Counters())`` adds a list up)."""
        total = Counters()
        total.add(self)
        total.add(other)
        return total

    def counters(self) -> dict[str, Any]:
        """The counts alone, by field name, in declaration order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(Counters)}


@dataclass(kw_only=True)
class StepStats(Counters):
    """Totals of one step over its buckets."""

    step: int
    buckets: int = 0
    """Buckets (records) added."""

    def add(self, other: Counters) -> None:
        """Add one bucket's record."""
        super().add(other)
        self.buckets += 1

    def as_dict(self) -> dict[str, Any]:
        """Plain values: step, buckets, the counters and the ratio."""
        return {"step": self.step, "buckets": self.buckets, **self.counters(), "ratio": self.ratio}


@dataclass
class Telemetry:
    """Collects bucket records into steps; thread-safe (records may come from a worker thread)."""

    last: StepStats | None = None
    last_buckets: list[BucketRecord] = field(default_factory=list)
    steps: int = 0
    total: Counters = field(default_factory=Counters)
    """Every closed step added up."""
    nonfinite_steps: int = 0
    compressed_steps: int = 0
    log_every: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._current: StepStats | None = None
        self._current_buckets: list[BucketRecord] = []

    def add(self, step: int, rec: BucketRecord) -> None:
        """Count one bucket's record into step ``step`` (a new step number starts a new step)."""
        with self._lock:
            if self._current is None or self._current.step != step:
                self._current = StepStats(step=step)
                self._current_buckets = []
            self._current.add(rec)
            self._current_buckets.append(rec)

    def end_step(self) -> StepStats | None:
        """Close the current step: fold it into the totals and log it every ``log_every`` steps."""
        with self._lock:
            cur, self._current = self._current, None
            if cur is None:
                return None
            self.last, self.last_buckets = cur, self._current_buckets
            self.steps += 1
            self.total.add(cur)
            self.nonfinite_steps += int(cur.nonfinite)
            self.compressed_steps += int(cur.compressed)
        if cur.nonfinite:
            logger.warning("step %d: non-finite gradient; residuals were left untouched", cur.step)
        if self.log_every and self.steps % self.log_every == 0:
            logger.info(
                "step %d: sent %.3f MB (dense %.3f MB, ratio %.1fx), comm %.1f ms (exposed %.1f ms), codec %.1f ms, "
                "residual %.3g",
                cur.step,
                cur.sent_bytes / 1e6,
                cur.dense_bytes / 1e6,
                cur.ratio,
                cur.comm_s * 1e3,
                cur.exposed_comm_s * 1e3,
                cur.codec_s * 1e3,
                cur.residual_norm,
            )
        return cur

    def summary(self) -> dict[str, Any]:
        """``{"step": last step, "buckets": [...], "total": cumulative}`` as plain values."""
        with self._lock:
            t = self.total
            total = {
                "steps": self.steps,
                "compressed_steps": self.compressed_steps,
                "nonfinite_steps": self.nonfinite_steps,
                "dense_bytes": t.dense_bytes,
                "sent_bytes": t.sent_bytes,
                "payload_bytes": t.payload_bytes,
                "ratio": t.ratio,
                "comm_s": t.comm_s,
                "codec_s": t.codec_s,
                "exposed_comm_s": t.exposed_comm_s,
            }
            return {
                "step": self.last.as_dict() if self.last else None,
                "buckets": [b.as_dict() for b in self.last_buckets],
                "total": total,
            }
