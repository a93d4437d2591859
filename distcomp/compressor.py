"""The compressor contract: average a bucket of gradients over ranks, sending less.

A compressor owns its algorithm state (error residuals, PowerSGD's Q, RNG state)
and nothing about DDP or FSDP: adapters turn their buckets into
:class:`~distcomp.bucket.Bucket` s and call :meth:`Compressor.reduce` in the same
bucket order on every rank.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from distcomp.bucket import Bucket
from distcomp.comm import Comm
from distcomp.config import require
from distcomp.errors import CheckpointError


@dataclass(kw_only=True, frozen=True)
class CompressorConfig:
    """Fields every compressor shares."""

    start_step: int = 0
    """First step that is compressed; earlier steps are an exact fp32-or-native all-reduce.
    DDP rebuilds its buckets after step 1, so compressors with state start at 2."""

    def __post_init__(self) -> None:
        require(self.start_step >= 0, "start_step", f"must be >= 0, got {self.start_step}")


class Compressor(abc.ABC):
    """Base class: subclasses implement :meth:`compress` and register with ``@register_compressor``.

    Checkpointing: :meth:`state_dict` holds this rank's state only (residuals
    differ per rank), never the process group; save one file per rank.
    """

    name: ClassVar[str]
    Config: ClassVar[type[CompressorConfig]] = CompressorConfig

    def __init__(self, config: CompressorConfig | None = None) -> None:
        self.config = config if config is not None else type(self).Config()

    def reduce(self, bucket: Bucket, comm: Comm, step: int) -> torch.Tensor:
        """The mean over ranks of ``bucket.buffer``, in its dtype; may overwrite the buffer."""
        start = time.perf_counter()
        rec = comm.record
        if step < self.config.start_step or bucket.numel == 0:
            out = exact_mean(bucket.buffer, comm)
        else:
            rec.compressed = True
            out = self.compress(bucket, comm, step)
        rec.total_s = time.perf_counter() - start
        return out

    @abc.abstractmethod
    def compress(self, bucket: Bucket, comm: Comm, step: int) -> torch.Tensor:
        """The (approximate) mean over ranks of ``bucket.buffer`` for a compressed step.

        Sets ``comm.record.residual_norm`` and ``comm.record.nonfinite``. When any
        rank's input is non-finite the result must be non-finite too (so an AMP
        scaler skips the step) and no state may be updated from it.
        """

    def state_dict(self) -> dict[str, Any]:
        """This rank's algorithm state as tensors and plain values (safe for ``weights_only`` loads)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; raise :class:`CheckpointError` on a mismatch."""
        if state:
            raise CheckpointError(f"compressor {self.name!r} keeps no state but the checkpoint has {sorted(state)}")


def exact_mean(buffer: torch.Tensor, comm: Comm) -> torch.Tensor:
    """DDP's own reduction: divide first (keeps fp16 from overflowing), then sum over ranks."""
    buffer.div_(comm.world_size)
    comm.all_reduce(buffer)
    # inf + -inf is NaN, so one sum tells whether any element is non-finite.
    comm.record.nonfinite = not bool(torch.isfinite(buffer.sum(dtype=torch.float32)))
    return buffer


def local_health(x: torch.Tensor) -> torch.Tensor:
    """A 1-element fp32 tensor: 0 when ``x`` is finite, NaN when it holds an inf or a NaN.

    Compressors append it to their first payload; summed or gathered over ranks it
    tells every rank whether any rank saw a non-finite gradient, at no extra collective.
    """
    return x.sum(dtype=torch.float32).reshape(1).mul_(0.0)
