"""``sign``: scaled 1-bit compression (signSGD with error feedback, as in 1-bit Adam).

Each block of ``block`` values is sent as its signs (1 bit each) and one fp32
scale, ``mean(|x|)``. Signs do not add up, so the two-phase schedule is used,
with error feedback on the worker and on the server side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distcomp.comm import Comm
from distcomp.compressor import CompressorConfig, local_health
from distcomp.compressors.twophase import TwoPhaseCompressor
from distcomp.config import require
from distcomp.kernels import sign_decode, sign_decode_add, sign_encode, sign_encode_ef
from distcomp.registry import register_compressor


@dataclass(frozen=True)
class SignCodec:
    """Rows of fp32 to ``[bits | fp32 scales]`` byte rows (see :class:`~distcomp.collectives.ChunkCodec`).

    Every method works in place on payload rows: codes and scales are written
    into, and read from, their columns of the payload, never through a copy.
    """

    block: int

    @property
    def align(self) -> int:
        return self.block

    def payload_bytes(self, length: int) -> int:
        return length // 8 + 4 * (length // self.block)

    def parts(
        self, payload: torch.Tensor, length: int, start: int = 0, stop: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(bits, scales)`` views of columns ``start..stop`` (block-aligned) of payload rows of ``length`` values."""
        stop = length if stop is None else stop
        nbits = length // 8
        scales = payload[:, nbits : nbits + 4 * (length // self.block)].view(torch.float32)
        return payload[:, start // 8 : stop // 8], scales[:, start // self.block : stop // self.block]

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
        if residual is None:
            _, scales = sign_encode(grad, self.block, out=parts)
        else:
            _, scales = sign_encode_ef(grad, residual, self.block, residual_out, out=parts)
        # mean(|x|) of a block is inf or NaN exactly when the block holds one.
        return local_health(scales)

    def decode(
        self, payload: torch.Tensor, length: int, out: torch.Tensor | None = None, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        bits, scales = self.parts(payload, length, start, stop)
        return sign_decode(bits, scales, self.block, out=out)

    def decode_add(self, payload: torch.Tensor, length: int, out: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        bits, scales = self.parts(payload, length)
        return sign_decode_add(bits, scales, self.block, out, alpha)


@register_compressor("sign")
class SignCompression(TwoPhaseCompressor):
    """1-bit sign compression with one scale per block and two-sided error feedback (~30x fewer bytes)."""

    @dataclass(kw_only=True, frozen=True)
    class Config(CompressorConfig):
        """Options of ``sign``."""

        block: int = 2048
        """Values sharing one scale; a multiple of 32. Smaller blocks are more accurate and send more scales."""
        start_step: int = 2
        """First compressed step (DDP rebuilds buckets after step 1; earlier steps are exact)."""
        error_feedback: bool = True
        """Keep worker and server residuals; without them 1-bit compression does not converge in general."""

        def __post_init__(self) -> None:
            super().__post_init__()
            require(self.block >= 32 and self.block % 32 == 0, "block", f"must be a positive multiple of 32, got {self.block}")

    def codec(self, comm: Comm, device: torch.device) -> SignCodec:
        return SignCodec(self.config.block)
