"""Block-wise symmetric integer quantization with stochastic rounding, and int4 packing.

A block of ``block`` values shares one fp32 scale ``absmax / qmax`` (``qmax`` is
127 for 8 bits, 7 for 4 bits). Stochastic rounding ``floor(v + u)``, ``u ~ U[0, 1)``,
is unbiased: ``E[q * scale] == x``. The uniform draws come from the caller's
generator, so a seeded run is reproducible.
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
    scales = xb.abs().amax(dim=-1) / qmax
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    v = xb / safe.unsqueeze(-1)
    if generator is None:
        v = v.round_()
    else:
        v = v.add_(torch.rand(v.shape, generator=generator, device=v.device)).floor_()
    q = v.clamp_(-qmax, qmax).to(torch.int8)
    return q.view(rows, length), scales


def dequantize_blockwise_ref(q: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise_ref`: fp32 rows ``q * scale``."""
    rows, nblocks = scales.shape
    out = q.view(rows, nblocks, block).to(torch.float32)
    return out.mul_(scales.unsqueeze(-1)).view(rows, nblocks * block)


def pack_int4_ref(q: torch.Tensor) -> torch.Tensor:
    """Two int4 values (``-8..7``) per byte: element ``2i`` in the low nibble, ``2i+1`` in the high one."""
    u = (q.reshape(-1, 2).to(torch.int16) & 0xF).to(torch.uint8)
    return (u[:, 0] | (u[:, 1] << 4)).view(*q.shape[:-1], q.shape[-1] // 2)


def unpack_int4_ref(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_ref` (sign-extends each nibble)."""
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    both = torch.stack([lo, hi], dim=-1)
    both = torch.where(both > 7, both - 16, both)
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


def dequantize_blockwise(q: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """Public op of :func:`dequantize_blockwise_ref`."""
    check_dtype(q, torch.int8, "dequantize_blockwise", "q")
    check_dtype(scales, torch.float32, "dequantize_blockwise", "scales")
    if q.numel() != scales.numel() * block:
        raise ValueError(f"dequantize_blockwise: {q.numel()} values do not match {scales.numel()} blocks of {block}")
    return dequantize_blockwise_ref(q, scales, block)


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
