"""Block-wise symmetric integer quantization with stochastic rounding, and int4 packing.

A block of ``block`` values shares one fp32 scale ``absmax / qmax`` (``qmax`` is
127 for 8 bits, 7 for 4 bits). Stochastic rounding ``floor(v + u)``, ``u ~ U[0, 1)``,
is unbiased: ``E[q * scale] == x`` (to 1/512 of a step: ``u`` has 256 levels).
The uniform draws come from the caller's generator, so a seeded run is reproducible.
"""

from __future__ import annotations

import torch

from distcomp.kernels._checks import check_block, check_dtype, check_float

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
    u = q.contiguous().view(torch.uint8).view(-1, 2)
    packed = (u[:, 0] & 0xF) | (u[:, 1] << 4)
    return packed.view(*q.shape[:-1], q.shape[-1] // 2)


def _int4_table(device: torch.device) -> torch.Tensor:
    """``[256, 2]`` int8: the sign-extended low and high nibble of each byte."""
    table = _INT4_TABLES.get(device)
    if table is None:
        v = torch.arange(256)
        nibbles = torch.stack([v & 0xF, v >> 4], dim=1)
        table = _INT4_TABLES[device] = torch.where(nibbles > 7, nibbles - 16, nibbles).to(torch.int8).to(device)
    return table


_INT4_TABLES: dict[torch.device, torch.Tensor] = {}


def unpack_int4_ref(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_ref` (sign-extends each nibble) by one table gather per byte."""
    both = torch.index_select(_int4_table(packed.device), 0, packed.reshape(-1).to(torch.int32))
    return both.view(*packed.shape[:-1], packed.shape[-1] * 2)


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
    return dequantize_blockwise_ref(q, scales, block, out)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Public op of :func:`pack_int4_ref` (last dimension even)."""
    check_dtype(q, torch.int8, "pack_int4", "q")
    if q.dim() == 0 or q.shape[-1] % 2:
        raise ValueError(f"pack_int4: the last dimension must be even, got shape {tuple(q.shape)}")
    return pack_int4_ref(q)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Public op of :func:`unpack_int4_ref`."""
    check_dtype(packed, torch.uint8, "unpack_int4", "packed")
    if packed.dim() == 0:
        raise ValueError("unpack_int4: expected at least 1-D input")
    return unpack_int4_ref(packed)
