"""1-bit sign packing, and the block-scaled sign codec built on it.

Bit ``i`` of byte ``j`` holds ``x[8 j + i] >= 0`` (zero packs as positive); read
as little-endian int32 words, the same bytes hold 32 signs per word. The scale
of a block is ``mean(|x|)``, which minimises ``||x - s * sign(x)||``.

Each public op validates its input and runs the Triton launcher of
:mod:`.sign_triton` on CUDA tensors (see :mod:`._backend`), the ``*_ref``
function elsewhere. Non-contiguous inputs are copied; outputs written in place
must be contiguous.
"""

from __future__ import annotations

import math

import torch
from distcomp.kernels._backend import use_triton
from distcomp.kernels._checks import (
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

# Eight 0/1 bytes read as one little-endian int64, times this constant, carry
# byte i's bit to bit 56 + i with no overlapping partial products.
_GATHER_BITS = 0x0102040810204080


def pack_signs_ref(x: torch.Tensor) -> torch.Tensor:
    """Signs of ``x`` (flattened) as bits, 8 per byte; length ``ceil(numel / 8)``."""
    flat = x.reshape(-1)
    n = flat.numel()
    nonneg = flat >= 0
    if n % 8:
        nonneg = torch.cat([nonneg, nonneg.new_zeros(8 - n % 8)])
    words = nonneg.view(torch.uint8).view(torch.int64)
    return ((words * _GATHER_BITS) >> 56).bitwise_and_(0xFF).to(torch.uint8)


def _sign_table(device: torch.device) -> torch.Tensor:
    """``[256, 8]`` fp32: row ``v`` holds ``+1``/``-1`` for bits 0..7 of byte ``v``."""
    table = _SIGN_TABLES.get(device)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = _SIGN_TABLES[device] = (bits * 2 - 1).to(torch.float32).to(device)
    return table


_SIGN_TABLES: dict[torch.device, torch.Tensor] = {}


def unpack_signs_ref(bits: torch.Tensor, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``+1``/``-1`` of dtype ``dtype`` for the first ``numel`` packed signs."""
    # One gather of 8 values per byte: much faster than shifting every bit.
    signs = torch.index_select(_sign_table(bits.device), 0, bits.reshape(-1).to(torch.int32))
    return signs.view(-1)[:numel].to(dtype)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Public op of :func:`pack_signs_ref`."""
    check_float(x, "pack_signs")
    if use_triton(x):
        from distcomp.kernels.sign_triton import pack_signs_triton

        return pack_signs_triton(x.contiguous())
    return pack_signs_ref(x)


def unpack_signs(bits: torch.Tensor, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Public op of :func:`unpack_signs_ref`."""
    check_dtype(bits, torch.uint8, "unpack_signs", "bits")
    if numel < 0 or numel > bits.numel() * 8:
        raise ValueError(f"unpack_signs: numel={numel} does not fit in {bits.numel()} bytes")
    if use_triton(bits):
        from distcomp.kernels.sign_triton import unpack_signs_triton

        return unpack_signs_triton(bits.contiguous(), numel, dtype)
    return unpack_signs_ref(bits, numel, dtype)


def sign_encode_ref(
    x: torch.Tensor, block: int, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``x[r]`` (length a multiple of ``block`` and of 8) to ``(bits [r, L/8], scales [r, L/block])``.

    ``out``, if given, is ``(bits, scales)`` to write into (row views of a payload).
    """
    rows, length = x.shape
    blocks = x.reshape(rows, length // block, block)
    scales = torch.linalg.vector_norm(blocks, ord=1, dim=-1, dtype=torch.float32).div_(block)
    bits = pack_signs_ref(x).view(rows, length // 8)
    if out is None:
        return bits, scales
    out[0].copy_(bits)
    out[1].copy_(scales)
    return out


def sign_decode_ref(
    bits: torch.Tensor, scales: torch.Tensor, block: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of :func:`sign_encode_ref`: fp32 rows ``sign * scale`` (written into ``out`` if given)."""
    rows, nblocks = scales.shape
    if out is None:
        out = torch.empty(rows * nblocks * block, dtype=torch.float32, device=bits.device)
    table = _sign_table(bits.device)
    torch.index_select(table, 0, bits.reshape(-1).to(torch.int32), out=out.view(-1, 8))
    out.view(rows, nblocks, block).mul_(scales.unsqueeze(-1))
    return out.view(rows, nblocks * block)


def sign_encode(
    x: torch.Tensor, block: int, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Public op of :func:`sign_encode_ref` (``x`` is 2-D).

    ``out = (bits [r, L/8] uint8, scales [r, L/block] fp32)``, if given, receives
    the encoding: row views with contiguous rows and any row stride (a payload's
    columns), so that nothing is copied into the payload afterwards.
    """
    check_float(x, "sign_encode")
    if x.dim() != 2:
        raise ValueError(f"sign_encode: expected 2-D rows, got shape {tuple(x.shape)}")
    check_block(x.shape[1], block, "sign_encode")
    check_block(x.shape[1], 8, "sign_encode")
    if out is not None:
        check_encode_out(out, x, x.shape[1] // 8, block, "sign_encode")
    if use_triton(x):
        from distcomp.kernels.sign_triton import sign_encode_triton

        return sign_encode_triton(x.contiguous(), block, out=out)
    return sign_encode_ref(x, block, out)


def sign_decode(bits: torch.Tensor, scales: torch.Tensor, block: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Public op of :func:`sign_decode_ref`; ``out``, if given, is a contiguous fp32 tensor of the result's size."""
    _check_decode(bits, scales, block, "sign_decode")
    if out is not None and (out.dtype != torch.float32 or out.numel() != bits.numel() * 8 or not out.is_contiguous()):
        raise ValueError("sign_decode: out must be a contiguous float32 tensor with 8 values per byte of bits")
    # The kernels give each byte one scale: blocks must not split bytes.
    if block % 8 == 0 and use_triton(bits):
        from distcomp.kernels.sign_triton import sign_decode_triton

        return sign_decode_triton(as_rows(bits, scales.shape[0]), scales, block, out)
    return sign_decode_ref(bits, scales, block, out)


def _check_decode(bits: torch.Tensor, scales: torch.Tensor, block: int, op: str) -> None:
    """Dtypes, 2-D scales, sizes that match, one device."""
    check_dtype(bits, torch.uint8, op, "bits")
    check_dtype(scales, torch.float32, op, "scales")
    if scales.dim() != 2:
        raise ValueError(f"{op}: scales must be 2-D [rows, blocks], got shape {tuple(scales.shape)}")
    if bits.numel() * 8 != scales.numel() * block:
        raise ValueError(f"{op}: {bits.numel()} bytes of bits do not match {scales.numel()} blocks of {block}")
    check_same_device(op, bits, scales)


def _bits_align(block: int) -> int:
    """Blocks per piece boundary so that pieces of a row start on a whole byte of bits."""
    return 8 // math.gcd(block, 8)


def sign_decode_add_ref(
    bits: torch.Tensor, scales: torch.Tensor, block: int, out: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """``out += alpha * sign_decode_ref(bits, scales)``; an ``out`` of one row's length gets the rows' sum.

    Works through the columns a cache-sized piece at a time, so no temporary of
    the rows' full size is made (it would be page-faulted in on every call).
    """
    rows, nblocks = scales.shape
    bits = as_rows(bits, rows)
    _, shape = decode_layout(out.numel(), rows, nblocks * block, "sign_decode_add_ref")
    summed = len(shape) == 1
    out2 = out.view(1 if summed else rows, nblocks * block)
    table = _sign_table(bits.device)
    for lo, hi in column_chunks(nblocks, block, rows, align=_bits_align(block)):
        piece = torch.index_select(table, 0, bits[:, lo * block // 8 : hi * block // 8].reshape(-1).to(torch.int32))
        piece = piece.view(rows, hi - lo, block).mul_(scales[:, lo:hi].unsqueeze(-1)).view(rows, -1)
        dest = out2[:, lo * block : hi * block]
        dest.add_(piece.sum(dim=0) if summed else piece, alpha=alpha)
    return out


def sign_decode_add(
    bits: torch.Tensor, scales: torch.Tensor, block: int, out: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """Decode and add, for the two-phase schedule: ``out += alpha * decode(bits, scales)``.

    ``bits [r, L/8]`` and ``scales [r, L/block]`` are rows (views into payload
    rows are fine); ``out`` is contiguous fp32 with ``r * L`` values (added row
    by row) or ``L`` values (the sum of the decoded rows is added, e.g. with
    ``alpha = 1 / world_size`` for a server's mean). Returns ``out``.
    """
    _check_decode(bits, scales, block, "sign_decode_add")
    rows, length = scales.shape[0], scales.shape[1] * block
    check_accumulate_out(out, rows, length, "sign_decode_add")
    check_same_device("sign_decode_add", bits, out)
    if block % 8 == 0 and use_triton(bits):
        from distcomp.kernels.sign_triton import sign_decode_triton

        sign_decode_triton(as_rows(bits, rows), scales, block, out, accumulate=True, alpha=alpha)
        return out
    return sign_decode_add_ref(bits, scales, block, out, alpha)


def sign_encode_ef_ref(
    grad: torch.Tensor,
    residual: torch.Tensor,
    block: int,
    residual_out: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Error feedback and sign encoding: ``corrected = grad + residual``, encode it, keep what it drops.

    Returns ``sign_encode_ref(corrected, block, out)`` and writes ``corrected - decode``
    into ``residual_out`` (default: ``residual``, in place). Works a cache-sized
    piece of columns at a time, so that ``corrected`` and the decoded values
    never exist at the input's full size.
    """
    rows, length = grad.shape
    if out is None:
        out = (
            torch.empty(rows, length // 8, dtype=torch.uint8, device=grad.device),
            torch.empty(rows, length // block, dtype=torch.float32, device=grad.device),
        )
    target = (residual if residual_out is None else residual_out).view(rows, length)
    residual = residual.view(rows, length)
    for r, lo, hi in row_column_chunks(rows, length // block, block, align=_bits_align(block)):
        a, b = lo * block, hi * block
        corrected = torch.add(residual[r, a:b], grad[r, a:b])
        bits, scales = sign_encode_ref(corrected, block, (out[0][r, a // 8 : b // 8], out[1][r, lo:hi]))
        decoded = sign_decode_ref(bits, scales, block).view(corrected.shape)
        torch.sub(corrected, decoded, out=target[r, a:b])
    return out


def sign_encode_ef(
    grad: torch.Tensor,
    residual: torch.Tensor,
    block: int,
    residual_out: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused error feedback + :func:`sign_encode` in one pass over memory.

    ``grad [r, L]`` (any float dtype) plus the fp32 ``residual`` of the same
    shape is encoded (into ``out``, as for :func:`sign_encode`, if given); the
    new residual ``corrected - decode(bits, scales)`` goes to ``residual_out``
    (contiguous fp32, same shape), or over ``residual`` when it is ``None``. A
    non-finite input shows as a non-finite scale of its block: check
    ``torch.isfinite(scales).all()`` before keeping the new residual, and pass a
    scratch ``residual_out`` so that a bad step does not poison the old one.
    """
    check_float(grad, "sign_encode_ef")
    check_dtype(residual, torch.float32, "sign_encode_ef", "residual")
    if grad.dim() != 2 or residual.shape != grad.shape:
        raise ValueError(
            "sign_encode_ef: expected 2-D rows and a residual of the same shape, "
            f"got {tuple(grad.shape)} and {tuple(residual.shape)}"
        )
    check_block(grad.shape[1], block, "sign_encode_ef")
    check_block(grad.shape[1], 8, "sign_encode_ef")
    check_contiguous(residual, "sign_encode_ef", "residual")
    if residual_out is not None:
        check_dtype(residual_out, torch.float32, "sign_encode_ef", "residual_out")
        check_contiguous(residual_out, "sign_encode_ef", "residual_out")
        if residual_out.numel() != residual.numel():
            raise ValueError(
                f"sign_encode_ef: residual_out has {residual_out.numel()} values, expected {residual.numel()}"
            )
    if out is not None:
        check_encode_out(out, grad, grad.shape[1] // 8, block, "sign_encode_ef")
    check_same_device("sign_encode_ef", grad, residual, *([residual_out] if residual_out is not None else []))
    if use_triton(grad):
        from distcomp.kernels.sign_triton import sign_encode_ef_triton

        return sign_encode_ef_triton(grad.contiguous(), residual, block, residual_out, out=out)
    return sign_encode_ef_ref(grad, residual, block, residual_out, out)
