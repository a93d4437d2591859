"""Integer blocks: each block of values as 8- or 4-bit integers and one fp32 scale, ``absmax / qmax``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distcomp.codecs.base import BlockCodec, Feedback, Parts
from distcomp.kernels import dequantize_codes, dequantize_codes_add, quantize_codes, quantize_codes_ef


@dataclass(frozen=True)
class IntCodec(BlockCodec):
    """Rows of fp32 to ``[codes | fp32 scales]`` byte rows (see :class:`~distcomp.codecs.BlockCodec`).

    Each encode draws its rounding noise from ``generator``.
    """

    bits: int
    """8 or 4; two 4-bit codes share a byte."""
    block: int
    """Values sharing one scale; a multiple of 32."""
    generator: torch.Generator | None
    """Stochastic rounding's random stream (on the data's device); ``None`` rounds to nearest."""

    @property
    def code_bits(self) -> int:
        return self.bits

    def _encode_parts(self, grad: torch.Tensor, feedback: Feedback | None, parts: Parts) -> torch.Tensor:
        if feedback is None:
            return quantize_codes(grad, self.bits, self.block, self.generator, out=parts)[1]
        residual, residual_out = feedback
        return quantize_codes_ef(grad, residual, self.bits, self.block, self.generator, residual_out, out=parts)[1]

    def _decode_parts(self, parts: Parts, out: torch.Tensor | None) -> torch.Tensor:
        return dequantize_codes(*parts, self.bits, self.block, out=out)

    def _decode_add_parts(self, parts: Parts, out: torch.Tensor, alpha: float) -> torch.Tensor:
        return dequantize_codes_add(*parts, self.bits, self.block, out, alpha)
