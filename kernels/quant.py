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
    CHUNK_VALUES,
    as_rows,
    check_accumulate_out,
    check_block,
    check_contiguous,
    check_dtype,
    check_encode_out,
    check_float,
    check_same_device,
    column_chunks,
    decode_layout,
    row_column_chunks,
)

QMAX = {8: 127, 4: 7}


def quantize_blockwise_ref(
    x: torch.Tensor, bits: int, block: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``x [r, L]`` to ``(q int8 [r, L], scales fp32 [r, L/block])``; deterministic rounding without ``generator``.

    The codes are computed a cache-sized run of blocks at a time: a temporary
    of the input's size would be page-faulted in afresh on every call.
    """
    rows, length = x.shape
    qmax = QMAX[bits]
    xb = x.reshape(rows * (length // block), block)
    # max(|x|) as max(max x, -min x): no temporary |x|; exact in x's dtype. (torch.aminmax over
    # short rows is an order of magnitude slower than the two reductions.)
    scales = torch.maximum(xb.amax(dim=-1), xb.amin(dim=-1).neg_()).to(torch.float32).div_(qmax)
    # Divide (not multiply by a reciprocal): 1/scale overflows for blocks of tiny values.
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(-1)
    noise = _uniform_bytes(xb.numel(), generator, x.device).view_as(xb) if generator is not None else None
    q = torch.empty(xb.shape, dtype=torch.int8, device=x.device)
    step = max(1, CHUNK_VALUES // max(block, 1))
    v_buf = torch.empty(min(step, xb.shape[0]), block, dtype=torch.float32, device=x.device)
    u_buf = torch.empty_like(v_buf) if noise is not None else None
    for a in range(0, xb.shape[0], step):
        b = min(a + step, xb.shape[0])
        v = torch.div(xb[a:b], divisor[a:b], out=v_buf[: b - a])
        if noise is None:
            v.round_()
        else:
            assert u_buf is not None  # allocated whenever there is noise
            # A uint8 operand in a float add is several times slower than a cast copy then a float add.
            u = u_buf[: b - a].copy_(noise[a:b])
            v.add_(u, alpha=1 / 256).add_(0.5 / 256).floor_()
        q[a:b].copy_(v.clamp_(-qmax, qmax))
    return q.view(rows, length), scales.view(rows, length // block)


def _uniform_bytes(numel: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``numel`` uniform random bytes: 8 per 64-bit draw, many times cheaper than float draws.

    ``(byte + 0.5) / 256`` dithers with 256 levels; the rounding bias this leaves
    is at most 1/512 of a quantization step.
    """
    # The full int64 range (from the minimum, no upper bound) is torch's fastest integer draw, and leaves
    # no byte's top bit at 0 (a draw without bounds has the sign bit clear).
    words = torch.empty(-(-numel // 8), dtype=torch.int64, device=device).random_(-(2**63), None, generator=generator)
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
    # int16 ops on cache-sized pieces (whole-tensor temporaries page-fault) instead of strided byte ops.
    w = q.view(torch.int16).reshape(-1)
    out = torch.empty(w.numel(), dtype=torch.uint8, device=q.device)
    low, high = (torch.empty(min(w.numel(), CHUNK_VALUES), dtype=torch.int16, device=q.device) for _ in range(2))
    for a in range(0, w.numel(), CHUNK_VALUES):
        b = min(a + CHUNK_VALUES, w.numel())
        packed = torch.bitwise_and(w[a:b], 0xF, out=low[: b - a])
        packed |= torch.bitwise_right_shift(w[a:b], 4, out=high[: b - a]).bitwise_and_(0xF0)
        out[a:b].copy_(packed)
    return out.view(*q.shape[:-1], q.shape[-1] // 2)


def unpack_int4_ref(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_ref` (sign-extends each nibble), in int16 lanes of one byte pair each."""
    flat = packed.reshape(-1)
    out = torch.empty(flat.numel(), dtype=torch.int16, device=packed.device)
    high = torch.empty(min(flat.numel(), CHUNK_VALUES), dtype=torch.int16, device=packed.device)
    for a in range(0, flat.numel(), CHUNK_VALUES):
        b = min(a + CHUNK_VALUES, flat.numel())
        w = out[a:b]
        w.copy_(flat[a:b])
        # Shifting a nibble to the top of the int16 and arithmetically back sign-extends it.
        h = torch.bitwise_left_shift(w, 8, out=high[: b - a])
        h >>= 12
        h <<= 8
        w <<= 12
        w >>= 12
        w &= 0xFF
        w |= h
    return out.view(torch.int8).view(*packed.shape[:-1], packed.shape[-1] * 2)


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
    """Public op of :func:`dequantize_blockwise_ref`.

    ``out``, if given, is a contiguous fp32 tensor of the result's size.
    """
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
    x: torch.Tensor,
    bits: int,
    block: int,
    generator: torch.Generator | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``x [r, L]`` to ``(codes uint8 [r, L * bits / 8], scales fp32 [r, L/block])`` (into ``out`` if given)."""
    q, scales = quantize_blockwise_ref(x, bits, block, generator)
    return _codes_of(q, scales, bits, out)


def _codes_of(
    q: torch.Tensor, scales: torch.Tensor, bits: int, out: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of int8 ``q``: its bytes (8 bits) or packed pairs (4 bits), written into ``out`` if given."""
    if out is None:
        return (q.view(torch.uint8) if bits == 8 else pack_int4_ref(q)), scales
    codes_out, scales_out = out
    if bits == 8:
        codes_out.copy_(q.view(torch.uint8))
    else:
        codes_out.copy_(pack_int4_ref(q))
    scales_out.copy_(scales)
    return out


def dequantize_codes_ref(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of :func:`quantize_codes_ref`: fp32 rows ``[r, L]`` (written into ``out`` if given)."""
    q = codes.contiguous().view(torch.int8) if bits == 8 else unpack_int4_ref(codes)
    return dequantize_blockwise_ref(q, scales, block, out)


def dequantize_codes_add_ref(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int, out: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """``out += alpha * dequantize_codes_ref(...)``; an ``out`` of one row's length gets the rows' sum.

    Works through the columns a cache-sized piece at a time, so no temporary of
    the rows' full size is made (it would be page-faulted in on every call).
    """
    rows, nblocks = scales.shape
    codes = as_rows(codes, rows)
    _, shape = decode_layout(out.numel(), rows, nblocks * block, "dequantize_codes_add_ref")
    summed = len(shape) == 1
    out2 = out.view(1 if summed else rows, nblocks * block)
    per_value = bits / 8
    for lo, hi in column_chunks(nblocks, block, rows):
        piece = codes[:, int(lo * block * per_value) : int(hi * block * per_value)]
        q = piece.contiguous().view(torch.int8) if bits == 8 else unpack_int4_ref(piece.contiguous())
        decoded = dequantize_blockwise_ref(q, scales[:, lo:hi], block)
        dest = out2[:, lo * block : hi * block]
        dest.add_(decoded.sum(dim=0) if summed else decoded, alpha=alpha)
    return out


def quantize_codes_ef_ref(
    grad: torch.Tensor,
    residual: torch.Tensor,
    bits: int,
    block: int,
    generator: torch.Generator | None = None,
    residual_out: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Error feedback and quantization: ``corrected = grad + residual``, quantize it, keep what it drops.

    Returns ``quantize_codes_ref(corrected, ...)`` (into ``out`` if given) and writes
    ``corrected - dequantized`` into ``residual_out`` (default: ``residual``, in
    place). Works a cache-sized piece of columns at a time (drawing the rounding
    noise piece by piece), so that ``corrected`` never exists at the input's full size.
    """
    rows, length = grad.shape
    if out is None:
        out = (
            torch.empty(rows, length * bits // 8, dtype=torch.uint8, device=grad.device),
            torch.empty(rows, length // block, dtype=torch.float32, device=grad.device),
        )
    target = (residual if residual_out is None else residual_out).view(rows, length)
    residual = residual.view(rows, length)
    for r, lo, hi in row_column_chunks(rows, length // block, block):
        a, b = lo * block, hi * block
        corrected = torch.add(residual[r, a:b], grad[r, a:b])
        q, scales = quantize_blockwise_ref(corrected, bits, block, generator)
        _codes_of(q, scales, bits, (out[0][r, a * bits // 8 : b * bits // 8], out[1][r, lo:hi]))
        decoded = dequantize_blockwise_ref(q, scales, block)
        torch.sub(corrected, decoded.view(corrected.shape), out=target[r, a:b])
    return out


def quantize_codes(
    x: torch.Tensor,
    bits: int,
    block: int,
    generator: torch.Generator | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_blockwise` then, for 4 bits, :func:`pack_int4`, in one pass: ``(codes uint8, scales)``.

    ``x`` is 2-D rows whose length is a multiple of the even ``block``; int8 codes
    come as their bytes, int4 codes two per byte (low nibble first). ``out =
    (codes, scales)``, if given, receives them: row views with contiguous rows and
    any row stride (a payload's columns). A non-finite input shows as a
    non-finite scale of its block.
    """
    _check_quantize(x, bits, block, out, "quantize_codes")
    if use_triton(x):
        from distcomp.kernels.quant_triton import quantize_blockwise_triton

        return quantize_blockwise_triton(x.contiguous(), bits, block, generator, packed=True, out=out)
    return quantize_codes_ref(x, bits, block, generator, out)


def _check_quantize(
    x: torch.Tensor, bits: int, block: int, out: tuple[torch.Tensor, torch.Tensor] | None, op: str
) -> None:
    """Rows of floats, 8 or 4 bits, an even block dividing the rows, and a fitting ``out``."""
    check_float(x, op)
    if bits not in QMAX:
        raise ValueError(f"{op}: bits must be 8 or 4, got {bits}")
    if x.dim() != 2:
        raise ValueError(f"{op}: expected 2-D rows, got shape {tuple(x.shape)}")
    check_block(x.shape[1], block, op)
    check_block(block, 2, op)
    if out is not None:
        check_encode_out(out, x, x.shape[1] * bits // 8, block, op)


def quantize_codes_ef(
    grad: torch.Tensor,
    residual: torch.Tensor,
    bits: int,
    block: int,
    generator: torch.Generator | None = None,
    residual_out: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused error feedback + :func:`quantize_codes` in one pass over memory (two for blocks over 8192 on CUDA).

    ``grad [r, L]`` (any float dtype) plus the fp32 ``residual`` of the same
    shape is quantized (into ``out`` if given); the new residual ``corrected -
    dequantize(codes, scales)`` goes to ``residual_out`` (contiguous fp32, same
    shape), or over ``residual`` when it is ``None``. A non-finite input shows as
    a non-finite scale of its block: pass a scratch ``residual_out`` and keep it
    only once the scales are known to be finite.
    """
    op = "quantize_codes_ef"
    _check_quantize(grad, bits, block, out, op)
    check_dtype(residual, torch.float32, op, "residual")
    if residual.shape != grad.shape:
        raise ValueError(
            f"{op}: the residual must have the gradient's shape {tuple(grad.shape)}, got {tuple(residual.shape)}"
        )
    check_contiguous(residual, op, "residual")
    if residual_out is not None:
        check_dtype(residual_out, torch.float32, op, "residual_out")
        check_contiguous(residual_out, op, "residual_out")
        if residual_out.numel() != residual.numel():
            raise ValueError(f"{op}: residual_out has {residual_out.numel()} values, expected {residual.numel()}")
    check_same_device(op, grad, residual, *([residual_out] if residual_out is not None else []))
    if use_triton(grad):
        from distcomp.kernels.quant_triton import quantize_blockwise_triton

        return quantize_blockwise_triton(
            grad.contiguous(),
            bits,
            block,
            generator,
            packed=True,
            out=out,
            residual=residual,
            residual_out=residual_out,
        )
    return quantize_codes_ef_ref(grad, residual, bits, block, generator, residual_out, out)


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
        raise ValueError(
            f"{op}: {codes.numel()} bytes of {bits}-bit codes do not match {scales.numel()} blocks of {block}"
        )
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
