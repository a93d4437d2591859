"""The contracts of chunk codecs, and the block layout that ``sign``, ``int8`` and ``int4`` share.

A chunk codec turns fp32 rows into fixed-size byte rows that the two-phase
schedule (:func:`~distcomp.collectives.two_phase_mean`) can all-to-all and
all-gather. Any codec with :class:`ChunkCodec`'s members works there; a
:class:`BlockCodec` (independent blocks, each ``[codes | scale]``) additionally
fuses error feedback into its encode and decodes by adding, so the schedule
never copies the bucket.
"""

from __future__ import annotations

from typing import Protocol, TypeGuard

import torch

from distcomp.numerics import local_health

Parts = tuple[torch.Tensor, torch.Tensor]
"""``(codes, scales)``: views of some block-aligned columns of payload rows."""
Feedback = tuple[torch.Tensor, torch.Tensor | None]
"""``(residual, residual_out)`` of an encode with error feedback (``None``: the new residual goes over the old)."""


class ChunkCodec(Protocol):
    """Encodes fp32 rows into fixed-size byte rows and back."""

    @property
    def align(self) -> int:
        """Row lengths must be a multiple of this."""

    def payload_bytes(self, length: int) -> int:
        """Bytes of one encoded row of ``length`` values (a multiple of 4)."""

    def encode(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        """Write the encoding of fp32 ``rows [r, L]`` into uint8 ``out [r, payload_bytes(L)]``."""

    def decode(self, payload: torch.Tensor, length: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 rows ``[r, length]`` from uint8 ``payload [r, payload_bytes(length)]`` (into ``out`` if given)."""


def is_fused(codec: ChunkCodec) -> TypeGuard[BlockCodec]:
    """Whether ``codec`` fuses error feedback into its encode and decodes by adding, as :class:`BlockCodec` does.

    Otherwise the two-phase schedule pads the input and decodes with copies.
    """
    return all(callable(getattr(codec, name, None)) for name in ("encode_ef", "decode_add"))


class BlockCodec:
    """A fused chunk codec: payload rows ``[codes | one fp32 scale per block]`` of independent blocks.

    Because blocks are independent, a row can be encoded piece by piece at block
    offsets (:meth:`encode_ef`'s ``start``), error feedback happens inside the
    encode, and received rows are summed by decoding into the sum
    (:meth:`decode_add`). Every method works in place on payload rows: codes and
    scales are written into, and read from, their columns of the payload, never
    through a copy.

    A subclass is a frozen dataclass with a ``block`` field, says how many bits
    a code takes (``code_bits``) and runs its kernels on :data:`Parts` of the
    payload in :meth:`_encode_parts`, :meth:`_decode_parts` and :meth:`_decode_add_parts`.
    """

    block: int

    @property
    def code_bits(self) -> int:
        """Bits of one code."""
        raise NotImplementedError

    @property
    def align(self) -> int:
        """Row lengths are whole blocks."""
        return self.block

    def _code_bytes(self, length: int) -> int:
        return length * self.code_bits // 8

    def payload_bytes(self, length: int) -> int:
        """Bytes of one encoded row of ``length`` values: the codes, then one fp32 scale per block."""
        return self._code_bytes(length) + 4 * (length // self.block)

    def parts(self, payload: torch.Tensor, length: int, start: int = 0, stop: int | None = None) -> Parts:
        """``(codes, scales)`` views of columns ``start..stop`` (block-aligned) of payload rows of ``length`` values."""
        stop = length if stop is None else stop
        ncode = self._code_bytes(length)
        scales = payload[:, ncode : ncode + 4 * (length // self.block)].view(torch.float32)
        codes = payload[:, self._code_bytes(start) : self._code_bytes(stop)]
        return codes, scales[:, start // self.block : stop // self.block]

    def encode(self, rows: torch.Tensor, out: torch.Tensor, length: int | None = None, start: int = 0) -> None:
        """Plain encoding (no residual) of ``rows`` into payload rows ``out``; see :meth:`encode_ef`."""
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
        """Encode rows ``grad [r, l]`` (any float dtype) plus the fp32 ``residual`` (none: plain encoding).

        The codes go to columns ``start .. start + l`` (block-aligned) of payload
        rows ``out`` holding ``length`` values each (default ``l``); the new
        residual ``grad + residual - decoded`` goes to ``residual_out`` (default:
        over ``residual``). Returns a health word (see
        :func:`~distcomp.numerics.local_health`) that is NaN when any encoded
        block held an inf or a NaN.
        """
        parts = self.parts(out, grad.shape[1] if length is None else length, start, start + grad.shape[1])
        scales = self._encode_parts(grad, None if residual is None else (residual, residual_out), parts)
        # Each codec's scale (mean or max of |x|) is inf or NaN exactly when its block holds one.
        return local_health(scales)

    def decode(
        self,
        payload: torch.Tensor,
        length: int,
        out: torch.Tensor | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> torch.Tensor:
        """Columns ``start .. stop`` (block-aligned; default all) of the payload rows as fp32 rows (into ``out``)."""
        return self._decode_parts(self.parts(payload, length, start, stop), out)

    def decode_add(self, payload: torch.Tensor, length: int, out: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``out += alpha * decode(payload)`` (``out`` of ``r * length`` values), or of the rows' sum (``length``)."""
        return self._decode_add_parts(self.parts(payload, length), out, alpha)

    def _encode_parts(self, grad: torch.Tensor, feedback: Feedback | None, parts: Parts) -> torch.Tensor:
        """Encode ``grad`` into ``parts`` (with error feedback when ``feedback`` is given); returns the scales."""
        raise NotImplementedError

    def _decode_parts(self, parts: Parts, out: torch.Tensor | None) -> torch.Tensor:
        """The fp32 rows of ``parts`` (into ``out`` if given)."""
        raise NotImplementedError

    def _decode_add_parts(self, parts: Parts, out: torch.Tensor, alpha: float) -> torch.Tensor:
        """``out += alpha * `` the rows of ``parts`` (or their sum, for an ``out`` of one row)."""
        raise NotImplementedError
