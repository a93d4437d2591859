"""``sign``: scaled 1-bit compression (signSGD with error feedback, as in 1-bit Adam).

Each block of ``block`` values is sent as its signs (1 bit each) and one fp32
scale, ``mean(|x|)``. Signs do not add up, so the two-phase schedule is used,
with error feedback on the worker and on the server side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from distcomp.comm import Comm
from distcomp.compressor import CompressorConfig
from distcomp.compressors.twophase import BlockCodec, TwoPhaseCompressor
from distcomp.validation import require
from distcomp.kernels import sign_decode, sign_decode_add, sign_encode, sign_encode_ef
from distcomp.registry import register_compressor


@dataclass(frozen=True)
class SignCodec(BlockCodec):
    """Rows of fp32 to ``[bits | fp32 scales]`` byte rows (see :class:`~distcomp.collectives.ChunkCodec`).

    Every method works in place on payload rows: codes and scales are written
    into, and read from, their columns of the payload, never through a copy.
    """

    block: int
    code_bits: ClassVar[int] = 1

    def _encode_parts(self, grad: torch.Tensor, residual: torch.Tensor | None, residual_out: torch.Tensor | None,
                      parts: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if residual is None:
            return sign_encode(grad, self.block, out=parts)[1]
        return sign_encode_ef(grad, residual, self.block, residual_out, out=parts)[1]

    def _decode_parts(self, codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        return sign_decode(codes, scales, self.block, out=out)

    def _decode_add_parts(self, codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor,
                          alpha: float) -> torch.Tensor:
        return sign_decode_add(codes, scales, self.block, out, alpha)


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
