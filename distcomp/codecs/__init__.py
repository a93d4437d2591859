"""Payload formats, independent of the compressors and collectives that schedule them.

* :class:`SignCodec` (sign bits and a scale per block) and :class:`IntCodec`
  (int8 / int4 codes and a scale per block): :class:`BlockCodec` rows for the
  two-phase schedule, with error feedback fused into the encode.
* :class:`TopKCodec` (values and indices) and :class:`RandomKCodec` (values at
  indices every rank draws alike): sparse payloads.
* :class:`CastCodec`: float16 / bfloat16 copies.

Each codec encodes, decodes, and decodes by adding into a tensor; the math is
that of :mod:`distcomp.kernels`.
"""

from distcomp.codecs.base import BlockCodec, ChunkCodec, is_fused
from distcomp.codecs.cast import CastCodec
from distcomp.codecs.quant import IntCodec
from distcomp.codecs.sign import SignCodec
from distcomp.codecs.sparse import RandomKCodec, TopKCodec

__all__ = ["BlockCodec", "CastCodec", "ChunkCodec", "IntCodec", "RandomKCodec", "SignCodec", "TopKCodec", "is_fused"]
