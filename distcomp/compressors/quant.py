"""``int8`` and ``int4``: block-wise quantization with stochastic rounding and error feedback.

Each block of ``block`` values is sent as 8- or 4-bit integers and one fp32
scale (``absmax / qmax``). Codes from different ranks have different scales and
do not add up, so the two-phase schedule is used, with error feedback on the
worker and on the server side. Stochastic rounding draws from a per-rank
generator whose state is checkpointed, so a resumed run is bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from distcomp.codecs import IntCodec
from distcomp.comm import Comm
from distcomp.compressors.twophase import TwoPhaseCompressor, TwoPhaseConfig
from distcomp.errors import CheckpointError
from distcomp.registry import register_compressor
from distcomp.validation import require


@dataclass(kw_only=True, frozen=True)
class QuantConfig(TwoPhaseConfig):
    """Options shared by ``int8`` and ``int4``."""

    block: int = 256
    """Values sharing one fp32 scale; a multiple of 32."""
    stochastic_rounding: bool = True
    """Round up with probability equal to the fraction (unbiased); otherwise round to nearest."""
    start_step: int = 2
    """First compressed step (DDP rebuilds buckets after step 1; earlier steps are exact)."""
    seed: int = 0
    """Seed of the rounding generator; each rank offsets it by its rank so the noise is independent."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.block >= 32 and self.block % 32 == 0, "block", f"must be a positive multiple of 32, got {self.block}"
        )


class _Quant(TwoPhaseCompressor):
    bits: ClassVar[int]
    config: QuantConfig

    def __init__(self, config: QuantConfig | None = None) -> None:
        super().__init__(config)
        self.generator: torch.Generator | None = None
        self._saved_generator: torch.Tensor | None = None
        self._generator_before: tuple[torch.Generator | None, torch.Tensor | None, torch.Tensor | None] = (
            None,
            None,
            None,
        )

    def codec(self, comm: Comm, device: torch.device) -> IntCodec:
        if not self.config.stochastic_rounding:
            return IntCodec(self.bits, self.config.block, None)
        if self.generator is None or self.generator.device != device:
            # Created where the gradients live (a CPU generator cannot fill a CUDA tensor),
            # seeded per rank so that ranks round independently.
            self.generator = torch.Generator(device=device).manual_seed(self.config.seed * 100_003 + comm.rank)
            if self._saved_generator is not None:
                self.generator.set_state(self._saved_generator)
                self._saved_generator = None
        return IntCodec(self.bits, self.config.block, self.generator)

    def begin_step(self) -> None:
        super().begin_step()
        gen = self.generator
        self._generator_before = (gen, None if gen is None else gen.get_state(), self._saved_generator)

    def end_step(self, keep: bool) -> None:
        super().end_step(keep)
        if not keep:  # a skipped step rounds nothing: rewind the stream (or undo its creation)
            gen, state, saved = self._generator_before
            self.generator, self._saved_generator = gen, saved
            if gen is not None and state is not None:
                gen.set_state(state)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        gen = self.generator.get_state() if self.generator is not None else self._saved_generator
        if gen is not None:
            state["generator"] = gen.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        gen = state.get("generator")
        if gen is not None and not isinstance(gen, torch.Tensor):
            raise CheckpointError(f"{self.name} state has a malformed 'generator' entry")
        super().load_state_dict({k: v for k, v in state.items() if k != "generator"})
        # Applied when the generator is created on the gradients' device.
        self.generator, self._saved_generator = None, gen


@register_compressor("int8")
class Int8Compression(_Quant):
    """8-bit block-wise quantization (~3.8x fewer bytes at block 256) with two-sided error feedback."""

    bits = 8

    @dataclass(kw_only=True, frozen=True)
    class Config(QuantConfig):
        """Options of ``int8``."""


@register_compressor("int4")
class Int4Compression(_Quant):
    """4-bit block-wise quantization, two codes per byte (~7x fewer bytes at block 256), two-sided error feedback."""

    bits = 4

    @dataclass(kw_only=True, frozen=True)
    class Config(QuantConfig):
        """Options of ``int4``."""
