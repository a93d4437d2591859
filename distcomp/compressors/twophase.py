"""Shared machinery of compressors whose payloads do not add up (sign, int8, int4).

They run the two-phase schedule of :func:`~distcomp.collectives.two_phase_mean`
with error feedback on both sides: each rank keeps a worker residual per
parameter, and a server residual for the chunk of each bucket it averages. Both
are updated inside the encode kernels (see
:class:`~distcomp.collectives.FusedChunkCodec`): the bucket is read once to
encode it and the mean is decoded straight into it (an fp32 bucket; others get a cast copy).
"""

from __future__ import annotations

from typing import Any

import torch

from distcomp.bucket import Bucket
from distcomp.collectives import ChunkCodec, chunk_length, two_phase_mean
from distcomp.comm import Comm
from distcomp.compressor import Compressor
from distcomp.error_feedback import ErrorFeedback
from distcomp.errors import CheckpointError
from distcomp.workspace import Workspace


class TwoPhaseCompressor(Compressor):
    """Base of ``sign``, ``int8`` and ``int4``; subclasses provide :meth:`codec`.

    Checkpointing: :meth:`state_dict` holds this rank's worker residuals by
    parameter name and its server residuals by bucket layout (the names of the
    bucket's parameters), with the world size they were made for.
    """

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.ef = ErrorFeedback(self.config.error_feedback)
        self.server: dict[tuple[str, ...], torch.Tensor] = {}
        self.world_size: int | None = None
        self.ws = Workspace()

    def codec(self, comm: Comm, device: torch.device) -> ChunkCodec:
        """The codec for this step (``comm`` tells the rank, for per-rank random streams; ``device``, the gradients')."""
        raise NotImplementedError

    def compress(self, bucket: Bucket, comm: Comm, step: int) -> torch.Tensor:
        self._check_world(comm.world_size)
        buf = bucket.buffer
        codec = self.codec(comm, buf.device)
        server_error = self._server_error(bucket, chunk_length(bucket.numel, comm.world_size, codec.align))
        ef = self.config.error_feedback
        res = two_phase_mean(
            comm, codec, buf, server_error, None, self.ws,
            residual=self.ef.residual(bucket) if ef else None,
            residual_out=self.ef.spare(bucket) if ef else None,
            out=buf if buf.dtype == torch.float32 and buf.is_contiguous() else None,
        )
        if res.nonfinite:
            comm.record.nonfinite = True
            return buf.fill_(float("nan"))
        if ef:
            self.server[bucket.key] = res.server_error
            comm.record.residual_norm = self.ef.commit_spare(bucket)
        return buf if res.out is buf else buf.copy_(res.out)

    def _check_world(self, world_size: int) -> None:
        if self.world_size is None:
            self.world_size = world_size
        elif self.world_size != world_size:
            raise CheckpointError(
                f"{self.name} state was made for {self.world_size} ranks but this job has {world_size}: "
                "server residuals are per chunk of the world; start from a fresh state for a new world size"
            )

    def _server_error(self, bucket: Bucket, chunk: int) -> torch.Tensor | None:
        if not self.config.error_feedback:
            return None
        err = self.server.get(bucket.key)
        if err is None:
            # Updated in place by two_phase_mean, and kept only after a finite step.
            return torch.zeros(chunk, dtype=torch.float32, device=bucket.buffer.device)
        if err.numel() != chunk:
            raise CheckpointError(
                f"{self.name} server residual for a bucket has {err.numel()} values, expected {chunk}: "
                "the checkpoint is from a different model, bucket size or world size"
            )
        return err

    def state_dict(self) -> dict[str, Any]:
        return {
            "residuals": self.ef.state_dict(),
            "server": [{"names": list(k), "residual": v.clone()} for k, v in self.server.items()],
            "world_size": self.world_size if self.world_size is not None else -1,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"residuals", "server", "world_size"} - set(state)
        if missing:
            raise CheckpointError(f"{self.name} state is missing {sorted(missing)}: not a {self.name} checkpoint")
        self.ef.load_state_dict(state["residuals"])
        self.world_size = None if state["world_size"] < 0 else int(state["world_size"])
        self.server = {tuple(e["names"]): e["residual"].clone() for e in state["server"]}
