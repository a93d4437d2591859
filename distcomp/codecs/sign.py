"""Sign bits and scales: each block of values as its signs (1 bit each) and one fp32 scale, ``mean(|x|)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distcomp.codecs.base import BlockCodec, Feedback, Parts
from distcomp.kernels import sign_decode, sign_decode_add, sign_encode, sign_encode_ef


@dataclass(frozen=True)
class SignCodec(BlockCodec):
    """Rows of fp32 to ``[bits | fp32 scales]`` byte rows (see :class:`~distcomp.codecs.BlockCodec`)."""

    block: int
    """Values sharing one scale; a multiple of 32."""

    @property
    def code_bits(self) -> int:
        return 1

    def _encode_parts(self, grad: torch.Tensor, feedback: Feedback | None, parts: Parts) -> torch.Tensor:
        if feedback is None:
            return sign_encode(grad, self.block, out=parts)[1]
        residual, residual_out = feedback
        return sign_encode_ef(grad, residual, self.block, residual_out, out=parts)[1]

    def _decode_parts(self, parts: Parts, out: torch.Tensor | None) -> torch.Tensor:
        return sign_decode(*parts, self.block, out=out)

    def _decode_add_parts(self, parts: Parts, out: torch.Tensor, alpha: float) -> torch.Tensor:
        return sign_decode_add(*parts, self.block, out, alpha)
