"""Block-wise symmetric integer quantization with stochastic rounding, and int4 packing.

A block of ``block`` values shares one fp32 scale ``absmax / qmax`` (``qmax`` is
127 for 8 bits, 7 for 4 bits). Stochastic rounding ``floor(v + u)``, ``u ~ U[0, 1)``,
is unbiased: ``E[q * scale] == x`` (to 1/512 of a step: ``u`` has 256 levels).
The uniform draws come from the caller's generator, so a seeded run is reproducible.

Each public op validates its input and runs the Triton launcher of
:mod:`.quant_triton` on CUDA tensors (see :mod:`._backend`), the ``*_ref``
function elsewhere. The Triton kernels round to nearest exactly as the
reference does; their stochastic rounding draws a seed from the same generator
and dithers with Philox (``tl.rand``), so it is as reproducible and as unbiased
but not the same random stream.

The ``*_codes`` ops work on the bytes a payload carries (int8 codes as bytes,
int4 codes two per byte): quantize-and-pack and unpack-and-dequantize in one
pass each, and a dequantize-and-add for the two-phase schedule.
"""

from __future__ import annotations

import torch

from distcomp.kernels._backend import use_triton
from distcomp.kernels._checks import (
    add_rows,
    as_rows,
    check_accumulate_out,
    check_block,
    check_dtype,
    check_float,
    check_same_device,
)

QMAX = {8: 127, 4: 7}


def quantize_blockwise_ref(
    x: torch.Tensor, bits: int, block: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``x [r, L]`` to ``(q int8 [r, L], scales fp32 [r, L/block])``; deterministic rounding without ``generator``."""
    rows, length = x.shape
    qmax = QMAX[bits]
    xb = x.reshape(rows, length // block, block).to(torch.float32)
    # max(|x|) as max(max x, -min x): two reductions, no temporary |x|.
    scales = torch.maximum(xb.amax(dim=-1), xb.amin(dim=-1).neg_()).div_(qmax)
    # Divide (not multiply by a reciprocal): 1/scale overflows for blocks of tiny values.
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
    v = torch.div(xb, divisor.unsqueeze(-1))
    if generator is None:
        v.round_()
    else:
        v.add_(_uniform_bytes(v.numel(), generator, v.device).view_as(v), alpha=1 / 256).add_(0.5 / 256).floor_()
    q = v.clamp_(-qmax, qmax).to(torch.int8)
    return q.view(rows, length), scales


def _uniform_bytes(numel: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``numel`` uniform random bytes: 4 per 32-bit draw, several times cheaper than float draws.

    ``(byte + 0.5) / 256`` dithers with 256 levels; the rounding bias this leaves
    is at most 1/512 of a quantization step.
    """
    # The full int32 range: random_() without bounds leaves the sign bit, and so every 4th byte's top bit, at 0.
    words = torch.empty(-(-numel // 4), dtype=torch.int32, device=device).random_(-(2**31), 2**31, generator=generator)
    return words.view(torch.uint8)[:numel]


def dequantize_blockwise_ref(
    q: torch.Tensor, scales: torch.Tensor, block: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_ref`: fp32 rows ``q * scale`` (written into ``out`` if given)."""
    rows, nblocks = scales.shape
    if out is None:
        out = torch.empty(q.numel(), dtype=torch.float32, device=q.device)
    out = out.view(rows, nblocks, block)
    out.copy_(q.view(rows, nblocks, block)).mul_(scales.unsqueeze(-1))
    return out.view(rows, nblocks * block)


def pack_int4_ref(q: torch.Tensor) -> torch.Tensor:
    """Two int4 values (``-8..7``) per byte: element ``2i`` in the low nibble, ``2i+1`` in the high one."""
    q = q.contiguous()
    if q.storage_offset() % 2:
        q = q.clone()  # an int16 view needs 2-byte alignment
    # A little-endian int16 holds element 2i in its low byte and 2i+1 in its high one: a few
    # whole-tensor int16 ops (in place where possible: fresh big temporaries page-fault) instead
    # of strided byte ops.
    w = q.view(torch.int16)
    packed = w & 0xF
    packed |= (w >> 4).bitwise_and_(0xF0)
    return packed.to(torch.uint8).view(*q.shape[:-1], q.shape[-1] // 2)


def unpack_int4_ref(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_ref` (sign-extends each nibble), in int16 lanes of one byte pair each."""
    w = packed.reshape(-1).to(torch.int16)
    # Shifting a nibble to the top of the int16 and arithmetically back sign-extends it.
    high = w << 8
    high >>= 12
    high <<= 8
    w <<= 12
    w >>= 12
    w &= 0xFF
    w |= high
    return w.view(torch.int8).view(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize_blockwise(
    x: torch.Tensor, bits: int, block: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Public op of :func:`quantize_blockwise_ref` (``x`` is 2-D rows, ``bits`` is 8 or 4)."""
    check_float(x, "quantize_blockwise")
    if bits not in QMAX:
        raise ValueError(f"quantize_blockwise: bits must be 8 or 4, got {bits}")
    if x.dim() != 2:
        raise ValueError(f"quantize_blockwise: expected 2-D rows, got shape {tuple(x.shape)}")
    check_block(x.shape[1], block, "quantize_blockwise")
    if block % 2 == 0 and use_triton(x):
        from distcomp.kernels.quant_triton import quantize_blockwise_triton

        return quantize_blockwise_triton(x.contiguous(), bits, block, generator)
    return quantize_blockwise_ref(x, bits, block, generator)


def dequantize_blockwise(
    q: torch.Tensor, scales: torch.Tensor, block: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Public op of :func:`dequantize_blockwise_ref`; ``out``, if given, is a contiguous fp32 tensor of the result's size."""
    check_dtype(q, torch.int8, "dequantize_blockwise", "q")
    check_dtype(scales, torch.float32, "dequantize_blockwise", "scales")
    if q.numel() != scales.numel() * block:
        raise ValueError(f"dequantize_blockwise: {q.numel()} values do not match {scales.numel()} blocks of {block}")
    if out is not None and (out.dtype != torch.float32 or out.numel() != q.numel() or not out.is_contiguous()):
        raise ValueError("dequantize_blockwise: out must be a contiguous float32 tensor with one value per code")
    if scales.dim() == 2 and use_triton(q):
        from distcomp.kernels.quant_triton import dequantize_blockwise_triton

        return dequantize_blockwise_triton(as_rows(q, scales.shape[0]), scales, block, out)
    return dequantize_blockwise_ref(q, scales, block, out)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Public op of :func:`pack_int4_ref` (last dimension even)."""
    check_dtype(q, torch.int8, "pack_int4", "q")
    if q.dim() == 0 or q.shape[-1] % 2:
        raise ValueError(f"pack_int4: the last dimension must be even, got shape {tuple(q.shape)}")
    if use_triton(q):
        from distcomp.kernels.quant_triton import pack_int4_triton

        return pack_int4_triton(q.contiguous())
    return pack_int4_ref(q)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Public op of :func:`unpack_int4_ref`."""
    check_dtype(packed, torch.uint8, "unpack_int4", "packed")
    if packed.dim() == 0:
        raise ValueError("unpack_int4: expected at least 1-D input")
    if use_triton(packed):
        from distcomp.kernels.quant_triton import unpack_int4_triton

        return unpack_int4_triton(packed.contiguous())
    return unpack_int4_ref(packed)


# -- payload codes: quantize-and-pack, unpack-and-dequantize ----------------------


def quantize_codes_ref(
    x: torch.Tensor, bits: int, block: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``x [r, L]`` to ``(codes uint8 [r, L * bits / 8], scales fp32 [r, L/block])``."""
    q, scales = quantize_blockwise_ref(x, bits, block, generator)
    return (q.view(torch.uint8) if bits == 8 else pack_int4_ref(q)), scales


def dequantize_codes_ref(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of :func:`quantize_codes_ref`: fp32 rows ``[r, L]`` (written into ``out`` if given)."""
    q = codes.contiguous().view(torch.int8) if bits == 8 else unpack_int4_ref(codes)
    return dequantize_blockwise_ref(q, scales, block, out)


def dequantize_codes_add_ref(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int, out: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """``out += alpha * dequantize_codes_ref(...)``; an ``out`` of one row's length gets the rows' sum."""
    return add_rows(out, dequantize_codes_ref(codes, scales, bits, block), alpha)


def quantize_codes(
    x: torch.Tensor, bits: int, block: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_blockwise` then, for 4 bits, :func:`pack_int4`, in one pass: ``(codes uint8, scales)``.

    ``x`` is 2-D rows whose length is a multiple of the even ``block``; int8 codes
    come as their bytes, int4 codes two per byte (low nibble first).
    """
    check_float(x, "quantize_codes")
    if bits not in QMAX:
        raise ValueError(f"quantize_codes: bits must be 8 or 4, got {bits}")
    if x.dim() != 2:
        raise ValueError(f"quantize_codes: expected 2-D rows, got shape {tuple(x.shape)}")
    check_block(x.shape[1], block, "quantize_codes")
    check_block(block, 2, "quantize_codes")
    if use_triton(x):
        from distcomp.kernels.quant_triton import quantize_blockwise_triton

        return quantize_blockwise_triton(x.contiguous(), bits, block, generator, packed=True)
    return quantize_codes_ref(x, bits, block, generator)


def _check_codes(codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int, op: str) -> tuple[int, int]:
    """Validate a codes/scales pair; returns ``(rows, values per row)``."""
    if bits not in QMAX:
        raise ValueError(f"{op}: bits must be 8 or 4, got {bits}")
    if codes.dtype not in (torch.uint8, torch.int8):
        raise TypeError(f"{op}: codes must be torch.uint8 (or torch.int8 for 8 bits), got {codes.dtype}")
    if bits == 4 and codes.dtype != torch.uint8:
        raise TypeError(f"{op}: packed int4 codes must be torch.uint8, got {codes.dtype}")
    check_dtype(scales, torch.float32, op, "scales")
    if scales.dim() != 2:
        raise ValueError(f"{op}: scales must be 2-D [rows, blocks], got shape {tuple(scales.shape)}")
    rows, length = scales.shape[0], scales.shape[1] * block
    if block <= 0 or block % 2 or codes.numel() * 8 != rows * length * bits:
        raise ValueError(f"{op}: {codes.numel()} bytes of {bits}-bit codes do not match {scales.numel()} blocks of {block}")
    check_same_device(op, codes, scales)
    return rows, length


def dequantize_codes(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Public op of :func:`dequantize_codes_ref`: unpack (int4) and dequantize in one pass.

    ``codes`` and ``scales`` are rows (views into payload rows are fine);
    ``out``, if given, is contiguous fp32 with one value per code.
    """
    rows, length = _check_codes(codes, scales, bits, block, "dequantize_codes")
    if out is not None and (out.dtype != torch.float32 or out.numel() != rows * length or not out.is_contiguous()):
        raise ValueError("dequantize_codes: out must be a contiguous float32 tensor with one value per code")
    if use_triton(codes):
        from distcomp.kernels.quant_triton import dequantize_blockwise_triton

        return dequantize_blockwise_triton(as_rows(codes, rows), scales, block, out, bits=bits)
    return dequantize_codes_ref(as_rows(codes, rows), scales, bits, block, out)


def dequantize_codes_add(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int, out: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """Dequantize and add, for the two-phase schedule: ``out += alpha * dequantize_codes(codes, scales)``.

    ``out`` is contiguous fp32 with ``r * L`` values (added row by row) or ``L``
    values (the sum of the decoded rows is added, e.g. with ``alpha = 1 /
    world_size`` for a server's mean). Returns ``out``.
    """
    rows, length = _check_codes(codes, scales, bits, block, "dequantize_codes_add")
    check_accumulate_out(out, rows, length, "dequantize_codes_add")
    check_same_device("dequantize_codes_add", codes, out)
    if use_triton(codes):
        from distcomp.kernels.quant_triton import dequantize_blockwise_triton

        dequantize_blockwise_triton(as_rows(codes, rows), scales, block, out, bits=bits, accumulate=True, alpha=alpha)
        return out
    return dequantize_codes_add_ref(as_rows(codes, rows), scales, bits, block, out, alpha)
