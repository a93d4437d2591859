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
from distcomp.numerics import local_health
from distcomp.error_feedback import ErrorFeedback
from distcomp.errors import CheckpointError
from distcomp.workspace import Workspace


class BlockCodec:
    """Payload rows ``[codes | one fp32 scale per block]`` of independent blocks, written and read in place.

    The layout and the fused-codec protocol (:class:`~distcomp.collectives.FusedChunkCodec`)
    that ``sign``, ``int8`` and ``int4`` share; a subclass is a frozen dataclass with a
    ``block`` field, says how many bits a code takes (``code_bits``) and runs its kernels in
    :meth:`_encode_parts`, :meth:`_decode_parts` and :meth:`_decode_add_parts`.
    """

    block: int
    code_bits: int

    @property
    def align(self) -> int:
        return self.block

    def _code_bytes(self, length: int) -> int:
        return length * self.code_bits // 8

    def payload_bytes(self, length: int) -> int:
        return self._code_bytes(length) + 4 * (length // self.block)

    def parts(
        self, payload: torch.Tensor, length: int, start: int = 0, stop: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, scales)`` views of columns ``start..stop`` (block-aligned) of payload rows of ``length`` values."""
        stop = length if stop is None else stop
        ncode = self._code_bytes(length)
        scales = payload[:, ncode : ncode + 4 * (length // self.block)].view(torch.float32)
        codes = payload[:, self._code_bytes(start) : self._code_bytes(stop)]
        return codes, scales[:, start // self.block : stop // self.block]

    def encode(self, rows: torch.Tensor, out: torch.Tensor, length: int | None = None, start: int = 0) -> None:
        self.encode_ef(rows, None, None, out, length, start)

    def encode_ef(
        self,
        grad: torch.Tensor,
        residual: torch.Tensor | None,
        residual_out: torch.Tensor | None,
        out: torch.Tensor,
        length: int | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        parts = self.parts(out, grad.shape[1] if length is None else length, start, start + grad.shape[1])
        scales = self._encode_parts(grad, residual, residual_out, parts)
        # Each codec's scale (mean or max of |x|) is inf or NaN exactly when its block holds one.
        return local_health(scales)

    def decode(
        self, payload: torch.Tensor, length: int, out: torch.Tensor | None = None, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        codes, scales = self.parts(payload, length, start, stop)
        return self._decode_parts(codes, scales, out)

    def decode_add(self, payload: torch.Tensor, length: int, out: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        codes, scales = self.parts(payload, length)
        return self._decode_add_parts(codes, scales, out, alpha)

    def _encode_parts(self, grad: torch.Tensor, residual: torch.Tensor | None, residual_out: torch.Tensor | None,
                      parts: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Encode into ``parts`` (with error feedback when ``residual`` is given); returns the scales."""
        raise NotImplementedError

    def _decode_parts(self, codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _decode_add_parts(self, codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor,
                          alpha: float) -> torch.Tensor:
        raise NotImplementedError


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
        # The server residuals this step wrote, made current at end_step (see ErrorFeedback).
        self._next_server: dict[tuple[str, ...], torch.Tensor] = {}
        self._spare_server: dict[tuple[str, ...], torch.Tensor] = {}
        self.world_size: int | None = None
        self._world_before: int | None = None
        self.ws = Workspace()

    def codec(self, comm: Comm, device: torch.device) -> ChunkCodec:
        """The codec for this step (``comm`` tells the rank, for per-rank random streams; ``device``, the gradients')."""
        raise NotImplementedError

    def compress(self, bucket: Bucket, comm: Comm, step: int) -> torch.Tensor:
        self._check_world(comm.world_size)
        buf = bucket.buffer
        codec = self.codec(comm, buf.device)
        chunk = chunk_length(bucket.numel, comm.world_size, codec.align)
        server_error = self._server_error(bucket, chunk)
        ef = self.config.error_feedback
        server_out = self._server_out(bucket, chunk) if ef else None
        res = two_phase_mean(
            comm, codec, buf, server_error, None, self.ws,
            residual=self.ef.residual(bucket) if ef else None,
            residual_out=self.ef.next_residual(bucket) if ef else None,
            server_out=server_out,
            out=buf if buf.dtype == torch.float32 and buf.is_contiguous() else None,
        )
        if res.nonfinite:
            comm.record.nonfinite = True
            return buf.fill_(float("nan"))
        if ef:
            self._next_server[bucket.key] = res.server_error
            comm.record.residual_norm = self.ef.stage(bucket)
        return buf if res.out is buf else buf.copy_(res.out)

    def begin_step(self) -> None:
        self._world_before = self.world_size

    def end_step(self, keep: bool) -> None:
        self.ef.end_step(keep)
        if keep:
            for key, new in self._next_server.items():
                old = self.server.get(key)
                self.server[key] = new
                if old is not None:
                    self._spare_server[key] = old
        else:
            self.world_size = self._world_before
            self._spare_server.update(self._next_server)
        self._next_server.clear()

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
            return torch.zeros(chunk, dtype=torch.float32, device=bucket.buffer.device)
        if err.numel() != chunk:
            raise CheckpointError(
                f"{self.name} server residual for a bucket has {err.numel()} values, expected {chunk}: "
                "the checkpoint is from a different model, bucket size or world size"
            )
        return err

    def _server_out(self, bucket: Bucket, chunk: int) -> torch.Tensor:
        """Where this step's new server residual goes: the buffer the current one replaced last time."""
        spare = self._spare_server.pop(bucket.key, None)
        if spare is None or spare.numel() != chunk or spare.device != bucket.buffer.device:
            spare = torch.empty(chunk, dtype=torch.float32, device=bucket.buffer.device)
        return spare

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
        self._next_server.clear()
        self._spare_server.clear()
