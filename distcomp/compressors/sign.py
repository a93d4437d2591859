"""``sign``: scaled 1-bit compression (signSGD with error feedback, as in 1-bit Adam).

Each block of ``block`` values is sent as its signs (1 bit each) and one fp32
scale, ``mean(|x|)``. Signs do not add up, so the two-phase schedule is used,
with error feedback on the worker and on the server side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distcomp.codecs import SignCodec
from distcomp.comm import Comm
from distcomp.compressors.twophase import TwoPhaseCompressor, TwoPhaseConfig
from distcomp.registry import register_compressor
from distcomp.validation import require


@register_compressor("sign")
class SignCompression(TwoPhaseCompressor):
    """1-bit sign compression with one scale per block and two-sided error feedback (~30x fewer bytes)."""

    @dataclass(kw_only=True, frozen=True)
    class Config(TwoPhaseConfig):
        """Options of ``sign``."""

        block: int = 2048
        """Values sharing one scale; a multiple of 32. Smaller blocks are more accurate and send more scales."""
        start_step: int = 2
        """First compressed step (DDP rebuilds buckets after step 1; earlier steps are exact)."""
        error_feedback: bool = True
        """Keep worker and server residuals; without them 1-bit compression does not converge in general."""

        def __post_init__(self) -> None:
            super().__post_init__()
            require(
                self.block >= 32 and self.block % 32 == 0,
                "block",
                f"must be a positive multiple of 32, got {self.block}",
            )

    config: Config

    def codec(self, comm: Comm, device: torch.device) -> SignCodec:
        return SignCodec(self.config.block)
