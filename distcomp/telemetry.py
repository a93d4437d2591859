"""Per-step and cumulative compression statistics, shared by hooks, FSDP and optimizers."""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from distcomp.comm import BucketRecord

logger = logging.getLogger("distcomp")


@dataclass(kw_only=True)
class StepStats:
    """Totals of one step over its buckets."""

    step: int
    buckets: int = 0
    numel: int = 0
    dense_bytes: float = 0.0
    payload_bytes: int = 0
    sent_bytes: float = 0.0
    collectives: int = 0
    comm_s: float = 0.0
    codec_s: float = 0.0
    residual_norm: float = 0.0
    nonfinite: bool = False
    compressed: bool = False

    @property
    def ratio(self) -> float:
        """Dense fp32 all-reduce bytes over bytes actually sent (``inf`` when nothing was sent)."""
        return self.dense_bytes / self.sent_bytes if self.sent_bytes else float("inf")

    def add(self, rec: BucketRecord) -> None:
        self.buckets += 1
        self.numel += rec.numel
        self.dense_bytes += rec.dense_bytes
        self.payload_bytes += rec.payload_bytes
        self.sent_bytes += rec.sent_bytes
        self.collectives += rec.collectives
        self.comm_s += rec.comm_s
        self.codec_s += max(rec.total_s - rec.comm_s, 0.0)
        # Norms of disjoint pieces add in squares.
        self.residual_norm = (self.residual_norm**2 + rec.residual_norm**2) ** 0.5
        self.nonfinite |= rec.nonfinite
        self.compressed |= rec.compressed

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ratio": self.ratio}


@dataclass
class Telemetry:
    """Collects :class:`BucketRecord` s into steps; thread-safe (records may come from a worker thread)."""

    last: StepStats | None = None
    last_buckets: list[BucketRecord] = field(default_factory=list)
    steps: int = 0
    dense_bytes: float = 0.0
    sent_bytes: float = 0.0
    payload_bytes: int = 0
    comm_s: float = 0.0
    codec_s: float = 0.0
    nonfinite_steps: int = 0
    compressed_steps: int = 0
    log_every: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._current: StepStats | None = None
        self._current_buckets: list[BucketRecord] = []

    def add(self, step: int, rec: BucketRecord) -> None:
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
            self.dense_bytes += cur.dense_bytes
            self.sent_bytes += cur.sent_bytes
            self.payload_bytes += cur.payload_bytes
            self.comm_s += cur.comm_s
            self.codec_s += cur.codec_s
            self.nonfinite_steps += int(cur.nonfinite)
            self.compressed_steps += int(cur.compressed)
        if cur.nonfinite:
            logger.warning("step %d: non-finite gradient; residuals were left untouched", cur.step)
        if self.log_every and self.steps % self.log_every == 0:
            logger.info(
                "step %d: sent %.3f MB (dense %.3f MB, ratio %.1fx), comm %.1f ms, codec %.1f ms, residual %.3g",
                cur.step, cur.sent_bytes / 1e6, cur.dense_bytes / 1e6, cur.ratio,
                cur.comm_s * 1e3, cur.codec_s * 1e3, cur.residual_norm,
            )
        return cur

    def summary(self) -> dict[str, Any]:
        """``{"step": last step, "buckets": [...], "total": cumulative}`` as plain values."""
        with self._lock:
            total = {
                "steps": self.steps,
                "compressed_steps": self.compressed_steps,
                "nonfinite_steps": self.nonfinite_steps,
                "dense_bytes": self.dense_bytes,
                "sent_bytes": self.sent_bytes,
                "payload_bytes": self.payload_bytes,
                "ratio": self.dense_bytes / self.sent_bytes if self.sent_bytes else float("inf"),
                "comm_s": self.comm_s,
                "codec_s": self.codec_s,
            }
            return {
                "step": self.last.as_dict() if self.last else None,
                "buckets": [dataclasses.asdict(b) for b in self.last_buckets],
                "total": total,
            }
