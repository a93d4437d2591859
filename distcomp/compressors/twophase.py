"""The scheduler of compressors whose payloads do not add up (sign, int8, int4).

Each step's buckets go through one :class:`~distcomp.exchange.TwoPhaseExchange`:
the two-phase schedule of :func:`~distcomp.collectives.two_phase_mean` with
error feedback on both sides. Each rank keeps a worker residual per parameter
(an :class:`~distcomp.error_feedback.ErrorFeedback`), and a server residual for
the chunk of each bucket it averages. Both are updated inside the encode
kernels (see :class:`~distcomp.codecs.BlockCodec`): the bucket is read once to
encode it and the mean is decoded straight into it (an fp32 bucket; others get
a cast copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from distcomp.bucket import Bucket
from distcomp.codecs import ChunkCodec
from distcomp.comm import Comm
from distcomp.compressor import Compressor, CompressorConfig
from distcomp.error_feedback import ErrorFeedback
from distcomp.errors import CheckpointError
from distcomp.exchange import TwoPhaseExchange


def _layout(bucket: Bucket) -> tuple[str, ...]:
    """A bucket's server residual is kept by its layout: the names of its parameters."""
    return bucket.key


@dataclass(kw_only=True, frozen=True)
class TwoPhaseConfig(CompressorConfig):
    """Options every two-phase compressor has."""

    error_feedback: bool = True
    """Keep worker and server residuals."""


class TwoPhaseCompressor(Compressor):
    """Base of ``sign``, ``int8`` and ``int4``; subclasses provide :meth:`codec`.

    Checkpointing: :meth:`state_dict` holds this rank's worker residuals by
    parameter name and its server residuals by bucket layout (the names of the
    bucket's parameters), with the world size they were made for.
    """

    config: TwoPhaseConfig

    def __init__(self, config: TwoPhaseConfig | None = None) -> None:
        super().__init__(config)
        self.ef = ErrorFeedback(self.config.error_feedback)
        self.exchange = TwoPhaseExchange(self.name, _layout, self.ef if self.config.error_feedback else None)

    def codec(self, comm: Comm, device: torch.device) -> ChunkCodec:
        """The codec for a step (``comm`` tells the rank, for per-rank random streams; ``device``, the gradients')."""
        raise NotImplementedError

    def compress(self, bucket: Bucket, comm: Comm, step: int) -> torch.Tensor:
        buf = bucket.buffer
        into = buf if buf.dtype == torch.float32 and buf.is_contiguous() else None
        res = self.exchange.reduce(comm, self.codec(comm, buf.device), buf, bucket, out=into)
        if res.nonfinite:
            return buf.fill_(float("nan"))
        return buf if res.out is buf else buf.copy_(res.out)

    def begin_step(self) -> None:
        self.exchange.begin_step()

    def end_step(self, keep: bool) -> None:
        self.exchange.end_step(keep)

    def state_dict(self) -> dict[str, Any]:
        state = self.exchange.state_dict()
        return {
            "residuals": self.ef.state_dict(),
            "server": [{"names": list(k), "residual": v} for k, v in state["server"].items()],
            "world_size": state["world_size"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"residuals", "server", "world_size"} - set(state)
        if missing:
            raise CheckpointError(f"{self.name} state is missing {sorted(missing)}: not a {self.name} checkpoint")
        self.ef.load_state_dict(state["residuals"])
        server = {tuple(e["names"]): e["residual"] for e in state["server"]}
        self.exchange.load_state_dict({"server": server, "world_size": state["world_size"]})
