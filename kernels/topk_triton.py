"""Triton kernels of top-k packing and scatter-add: kernel -> launcher; public ops in :mod:`.topk`.

Importing this module imports ``triton`` (see :mod:`._backend`).

Selection follows the reference's plan with one pass over memory: a threshold
is guessed from a strided sample, :func:`_select_kernel` compacts the indices
of entries at or above it (``|x|``, compare and compaction fused, slots taken
with one atomic per program), and the top-k of those few candidates is taken
by ``torch.topk``. Candidates are sorted first, so the payload does not depend
on the order in which programs ran. With too few or too many candidates it
falls back to ``torch.topk`` over all of ``|x|``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from distcomp.kernels._checks import check_contiguous, check_pow2

SELECT_BLOCK = 4096
PACK_BLOCK = 1024
SAMPLE = 65536
"""Entries in the strided sample that sets the threshold (as in the reference)."""


@triton.jit
def _select_kernel(x_ptr, threshold_ptr, cand_ptr, count_ptr, n, capacity, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    hit = (tl.abs(x) >= tl.load(threshold_ptr)) & (offs < n)
    hits = hit.to(tl.int32)
    base = tl.atomic_add(count_ptr, tl.sum(hits, axis=0))
    slot = base + tl.cumsum(hits, axis=0) - 1
    tl.store(cand_ptr + slot, offs, mask=hit & (slot < capacity))


@triton.jit
def _topk_pack_kernel(x_ptr, idx_ptr, payload_ptr, k, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < k
    idx = tl.load(idx_ptr + i, mask=ok, other=0)
    v = tl.load(x_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    tl.store(payload_ptr + i, v.to(tl.int32, bitcast=True), mask=ok)
    tl.store(payload_ptr + k + i, idx.to(tl.int32), mask=ok)


@triton.jit
def _scatter_add_kernel(out_ptr, payload_ptr, n, k, row_stride, BLOCK: tl.constexpr):
    row = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < k
    base = payload_ptr + row * row_stride
    v = tl.load(base + i, mask=ok, other=0).to(tl.float32, bitcast=True)
    idx = tl.load(base + k + i, mask=ok, other=0)
    # An index out of range (a corrupt payload) must not write outside out.
    tl.atomic_add(out_ptr + idx, v, mask=ok & (idx >= 0) & (idx < n), sem="relaxed")


def topk_indices_triton(flat: torch.Tensor, k: int, select_block: int = SELECT_BLOCK) -> torch.Tensor:
    """Indices (int64) of the ``k`` entries of largest magnitude of contiguous 1-D ``flat``."""
    check_pow2(select_block, "topk_indices_triton", "select_block")
    n = flat.numel()
    if k == 0 or n < SAMPLE or k * 8 > n:
        return flat.abs().topk(k, sorted=False).indices
    sample = flat[:: max(n // SAMPLE, 1)].abs()
    # Aim for ~1.5 k candidates so one guess almost always suffices; room for 4 k.
    want = min(int(sample.numel() * 1.5 * k / n) + 1, sample.numel())
    threshold = sample.topk(want, sorted=False).values.min().float().reshape(1)
    capacity = 4 * k + 1024
    cand = torch.empty(capacity, dtype=torch.int64, device=flat.device)
    count = torch.zeros(1, dtype=torch.int32, device=flat.device)
    _select_kernel[(triton.cdiv(n, select_block),)](flat, threshold, cand, count, n, capacity, BLOCK=select_block)
    found = int(count.item())
    if not k <= found <= capacity:
        return flat.abs().topk(k, sorted=False).indices
    cand = cand[:found].sort().values
    return cand[flat[cand].abs().topk(k, sorted=False).indices]


def topk_pack_triton(
    x: torch.Tensor, k: int, block: int = PACK_BLOCK, select_block: int = SELECT_BLOCK
) -> torch.Tensor:
    """Triton :func:`~distcomp.kernels.topk.topk_pack_ref` of contiguous ``x``: ``[values as int32 | indices]``."""
    check_contiguous(x, "topk_pack_triton", "x")
    check_pow2(block, "topk_pack_triton", "block")
    flat = x.view(-1)
    indices = topk_indices_triton(flat, k, select_block)
    return pack_indices_triton(flat, indices, block)


def pack_indices_triton(flat: torch.Tensor, indices: torch.Tensor, block: int = PACK_BLOCK) -> torch.Tensor:
    """``[flat[indices] as fp32 bits | indices]`` as one int32 payload, in one kernel."""
    check_pow2(block, "pack_indices_triton", "block")
    k = indices.numel()
    payload = torch.empty(2 * k, dtype=torch.int32, device=flat.device)
    if k:
        _topk_pack_kernel[(triton.cdiv(k, block),)](flat, indices.contiguous(), payload, k, BLOCK=block)
    return payload


def topk_scatter_add_triton(out: torch.Tensor, payloads: torch.Tensor, block: int = PACK_BLOCK) -> torch.Tensor:
    """Triton :func:`~distcomp.kernels.topk.topk_scatter_add_ref`: atomic adds, one program per row tile.

    Duplicate indices are summed in no fixed order, as by ``index_add_`` on CUDA.
    Indices outside ``out`` are skipped (the reference raises instead): a kernel
    must never write outside its output.
    """
    check_contiguous(out, "topk_scatter_add_triton", "out")
    check_pow2(block, "topk_scatter_add_triton", "block")
    k = payloads.shape[-1] // 2
    if k == 0 or payloads.numel() == 0:
        return out
    rows_2d = payloads.reshape(-1, payloads.shape[-1])
    if rows_2d.stride(-1) != 1:
        rows_2d = rows_2d.contiguous()
    grid = (triton.cdiv(k, block), rows_2d.shape[0])
    _scatter_add_kernel[grid](out, rows_2d, out.numel(), k, rows_2d.stride(0), BLOCK=block)
    return out
