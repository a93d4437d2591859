"""``topk`` and ``randomk``: send a small fraction of the gradient, keep the rest as residual.

``topk`` keeps the entries of largest magnitude on each rank; ranks pick
different entries, so values and indices are all-gathered and every rank
scatter-adds them. ``randomk`` draws the same random entries on every rank
(a generator seeded identically everywhere), so the values alone are summable
and go through one all-reduce.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from distcomp.bucket import Bucket
from distcomp.codecs import RandomKCodec
from distcomp.collectives import exact_mean, sparse_mean
from distcomp.comm import Comm
from distcomp.compressor import Compressor, CompressorConfig
from distcomp.error_feedback import ErrorFeedback
from distcomp.errors import CheckpointError
from distcomp.numerics import local_health
from distcomp.registry import register_compressor
from distcomp.validation import require
from distcomp.workspace import Workspace

logger = logging.getLogger("distcomp")


@dataclass(kw_only=True, frozen=True)
class SparseConfig(CompressorConfig):
    """Options shared by ``topk`` and ``randomk``."""

    ratio: float = 0.01
    """Fraction of each bucket's entries sent per step (ignored when ``k`` is set)."""
    k: int | None = None
    """Entries sent per bucket per step; at most the bucket size."""
    start_step: int = 2
    """First compressed step (DDP rebuilds buckets after step 1; earlier steps are exact)."""
    error_feedback: bool = True
    """Add what was not sent back into the next step's gradient."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0.0 < self.ratio <= 1.0, "ratio", f"must be in (0, 1], got {self.ratio}")
        require(self.k is None or self.k >= 1, "k", f"must be >= 1 or null, got {self.k}")

    def k_for(self, numel: int) -> int:
        """Entries to send from a bucket of ``numel`` values."""
        k = self.k if self.k is not None else round(self.ratio * numel)
        return max(1, min(k, numel))


class _Sparse(Compressor):
    config: SparseConfig

    def __init__(self, config: SparseConfig | None = None) -> None:
        super().__init__(config)
        self.ef = ErrorFeedback(self.config.error_feedback)
        self.ws = Workspace()

    def _finish(
        self,
        bucket: Bucket,
        comm: Comm,
        corrected: torch.Tensor,
        mean: torch.Tensor,
        local: torch.Tensor,
        nonfinite: bool,
    ) -> torch.Tensor:
        if nonfinite:
            comm.record.nonfinite = True
            return bucket.buffer.fill_(float("nan"))
        comm.record.residual_norm = self.ef.stage(bucket, corrected, local)
        return bucket.buffer.copy_(mean)

    def end_step(self, keep: bool) -> None:
        self.ef.end_step(keep)

    def state_dict(self) -> dict[str, Any]:
        return {"residuals": self.ef.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "residuals" not in state:
            raise CheckpointError(f"{self.name} state has no 'residuals': not a {self.name} checkpoint")
        self.ef.load_state_dict(state["residuals"])


@register_compressor("topk")
class TopK(_Sparse):
    """Top-k sparsification with error feedback; values and int32 indices are all-gathered.

    A bucket where ``k >= numel / world_size`` is averaged exactly instead (with one
    warning): gathering that many values and indices would send more than a dense all-reduce.

    Checkpointing: :meth:`state_dict` holds this rank's residuals by parameter name.
    """

    @dataclass(kw_only=True, frozen=True)
    class Config(SparseConfig):
        """Options of ``topk``."""

    config: Config

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config)
        self._warned_dense = False

    def compress(self, bucket: Bucket, comm: Comm, step: int) -> torch.Tensor:
        corrected = self.ef.corrected(bucket)
        n, k = corrected.numel(), self.config.k_for(corrected.numel())
        if k * comm.world_size >= n:
            return self._dense(bucket, comm, corrected, k)
        mean, local, nonfinite = sparse_mean(comm, corrected, k, local_health(corrected), self.ws)
        return self._finish(bucket, comm, corrected, mean, local, nonfinite)

    def _dense(self, bucket: Bucket, comm: Comm, corrected: torch.Tensor, k: int) -> torch.Tensor:
        """Average the corrected bucket exactly: gathering k values and indices from every rank would send more.

        All-gathering ``k`` (value, index) pairs sends ``8 k (w - 1)`` bytes, a dense
        ring all-reduce ``8 n (w - 1) / w``: top-k pays only while ``k < n / w``.
        """
        if not self._warned_dense:
            self._warned_dense = True
            setting = f"k={self.config.k}" if self.config.k is not None else f"ratio={self.config.ratio}"
            logger.warning(
                "topk: %s keeps %d of a bucket's %d values; gathering them from %d ranks would send more than a "
                "dense all-reduce (top-k pays only while k < numel / world_size = %d), so such buckets are "
                "averaged exactly instead; lower %s",
                setting,
                k,
                corrected.numel(),
                comm.world_size,
                corrected.numel() // comm.world_size,
                setting.split("=")[0],
            )
        # Everything is sent, so the new residual is zero: the mean minus itself.
        mean = exact_mean(corrected, comm)
        return self._finish(bucket, comm, mean, mean, mean, comm.record.nonfinite)


@register_compressor("randomk")
class RandomK(_Sparse):
    """Random-k sparsification with error feedback; indices come from a generator shared by all ranks.

    Checkpointing: :meth:`state_dict` adds the generator state to the residuals.
    """

    @dataclass(kw_only=True, frozen=True)
    class Config(SparseConfig):
        """Options of ``randomk``."""

        seed: int = 0
        """Seed of the index generator (identical on every rank, so payloads are summable)."""

    config: Config

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self._generator_before = self.generator.get_state()

    def begin_step(self) -> None:
        self._generator_before = self.generator.get_state()

    def end_step(self, keep: bool) -> None:
        super().end_step(keep)
        if not keep:  # a skipped step draws nothing: every rank rewinds alike, so indices stay shared
            self.generator.set_state(self._generator_before)

    def compress(self, bucket: Bucket, comm: Comm, step: int) -> torch.Tensor:
        corrected = self.ef.corrected(bucket)
        n, dev = corrected.numel(), corrected.device
        codec = RandomKCodec.draw(n, self.config.k_for(n), self.generator, dev)
        values = codec.encode(corrected)
        summed = comm.all_reduce(torch.cat([values, local_health(corrected)]))
        local = codec.decode(values, n, out=self.ws.get("local", n, torch.float32, dev))
        mean = codec.decode(summed[:-1].div_(comm.world_size), n, out=self.ws.get("mean", n, torch.float32, dev))
        nonfinite = not bool(torch.isfinite(summed[-1]))
        return self._finish(bucket, comm, corrected, mean, local, nonfinite)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" not in state:
            raise CheckpointError("randomk state has no 'generator': not a randomk checkpoint")
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
