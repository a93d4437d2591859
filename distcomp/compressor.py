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
from distcomp.collectives import exact_mean
from distcomp.comm import Comm
from distcomp.errors import CheckpointError
from distcomp.validation import require


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
        # A step is open from its first compressed bucket to the one that ends it.
        self._step_open = False
        self._step_nonfinite = False

    def reduce(self, bucket: Bucket, comm: Comm, step: int, *, ends_step: bool = True) -> torch.Tensor:
        """The mean over ranks of ``bucket.buffer``, in its dtype; may overwrite the buffer.

        A step may span several buckets: pass ``ends_step=False`` for all but the
        last (a DDP backward pass calls the hook once per bucket). The state this
        step's buckets computed is kept only when every bucket of the step was
        finite on every rank (see :meth:`end_step`); by default each call is a step.
        """
        start = time.perf_counter()
        rec = comm.record
        try:
            if step < self.config.start_step or bucket.numel == 0:
                out = exact_mean(bucket.buffer, comm)
            else:
                if not self._step_open:
                    self._step_open = True
                    self.begin_step()
                rec.compressed = True
                out = self.compress(bucket, comm, step)
        except BaseException:
            self._close_step(keep=False)
            raise
        self._step_nonfinite = self._step_nonfinite or rec.nonfinite
        if ends_step:
            self._close_step(keep=not self._step_nonfinite)
        rec.total_s = time.perf_counter() - start
        return out

    def _close_step(self, keep: bool) -> None:
        if self._step_open:
            self.end_step(keep)
        self._step_open = self._step_nonfinite = False

    def begin_step(self) -> None:  # noqa: B027 - optional hook: stateless compressors keep nothing
        """Called before the first compressed bucket of a step: remember what a dropped step restores (RNG states)."""

    def end_step(self, keep: bool) -> None:  # noqa: B027 - optional hook, as begin_step
        """Make the state this step's buckets staged current (``keep``), or drop it and restore what
        :meth:`begin_step` remembered, so that a skipped step leaves no trace."""

    @abc.abstractmethod
    def compress(self, bucket: Bucket, comm: Comm, step: int) -> torch.Tensor:
        """The (approximate) mean over ranks of ``bucket.buffer`` for a compressed step.

        Sets ``comm.record.residual_norm`` and ``comm.record.nonfinite``. When any
        rank's input is non-finite the result must be non-finite too (so an AMP
        scaler skips the step). New state (residuals, Q) is staged, and becomes
        current only at :meth:`end_step`.
        """

    def state_dict(self) -> dict[str, Any]:
        """This rank's algorithm state as tensors and plain values (safe for ``weights_only`` loads)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; raise :class:`CheckpointError` on a mismatch."""
        if state:
            raise CheckpointError(f"compressor {self.name!r} keeps no state but the checkpoint has {sorted(state)}")
