"""Top-k selection into one contiguous payload, and scatter-add of gathered payloads.

A payload is an int32 tensor ``[2k]``: ``k`` fp32 values bit-cast to int32, then
their ``k`` indices. One buffer means one collective per bucket.

Each public op validates its input and runs the Triton launcher of
:mod:`.topk_triton` on CUDA tensors (see :mod:`._backend`), the ``*_ref``
function elsewhere. Which of several equal magnitudes at the k-th place is
kept, and the order of entries in a payload, are unspecified.
"""

from __future__ import annotations

import torch
from distcomp.kernels._backend import use_triton
from distcomp.kernels._checks import CHUNK_VALUES, check_dtype, check_float, check_same_device


def topk_pack_ref(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` entries of largest magnitude of flat ``x`` as an int32 payload ``[2k]``."""
    flat = x.reshape(-1)
    indices = _topk_indices(flat, k)
    values = flat[indices].to(torch.float32)
    return torch.cat([values.view(torch.int32), indices.to(torch.int32)])


def _topk_indices(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` entries of largest magnitude of ``flat``: exact, and fast for small ``k / n``.

    A full top-k over millions of entries is slow on CPU. Instead a threshold is
    guessed from a strided sample, every entry at or above it in magnitude
    becomes a candidate (found a cache-sized piece at a time: ``|x|`` of the
    whole input would be a fresh temporary, page-faulted in on every call), and
    the top-k of the candidates is taken. When there are at least ``k``
    candidates they contain the true top-k; otherwise this falls back to the
    full top-k.
    """
    n = flat.numel()
    if k == 0 or n < 65536 or k * 8 > n:
        return flat.abs().topk(k, sorted=False).indices
    sample = flat[:: max(n // 65536, 1)].abs()
    # Aim for ~1.5 k candidates so one guess almost always suffices.
    want = min(int(sample.numel() * 1.5 * k / n) + 1, sample.numel())
    threshold = sample.topk(want, sorted=False).values.min()
    candidates = _at_least(flat, threshold)
    if candidates.numel() < k:
        return flat.abs().topk(k, sorted=False).indices
    return candidates[flat[candidates].abs().topk(k, sorted=False).indices]


def _at_least(flat: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Indices (int64, ascending) of the entries with ``|x| >= threshold``, in cache-sized pieces."""
    n = flat.numel()
    mag = torch.empty(min(n, CHUNK_VALUES), dtype=flat.dtype, device=flat.device)
    hit = torch.empty(mag.numel(), dtype=torch.bool, device=flat.device)
    found = []
    for a in range(0, n, CHUNK_VALUES):
        b = min(a + CHUNK_VALUES, n)
        torch.ge(torch.abs(flat[a:b], out=mag[: b - a]), threshold, out=hit[: b - a])
        found.append(torch.nonzero(hit[: b - a]).squeeze(1).add_(a))
    return torch.cat(found)


def topk_scatter_add_ref(out: torch.Tensor, payloads: torch.Tensor) -> torch.Tensor:
    """Add every payload row of ``payloads [rows, 2k]`` into flat fp32 ``out``; returns ``out``."""
    k = payloads.shape[-1] // 2
    values = payloads[..., :k].contiguous().view(torch.float32).reshape(-1)
    indices = payloads[..., k:].reshape(-1).to(torch.int64)
    return out.index_add_(0, indices, values)


def topk_pack(x: torch.Tensor, k: int) -> torch.Tensor:
    """Public op of :func:`topk_pack_ref`."""
    check_float(x, "topk_pack")
    if not 0 <= k <= x.numel():
        raise ValueError(f"topk_pack: k={k} must be between 0 and numel={x.numel()}")
    if x.numel() >= 2**31:
        raise ValueError(f"topk_pack: {x.numel()} elements do not fit int32 indices; use smaller buckets")
    if use_triton(x):
        from distcomp.kernels.topk_triton import topk_pack_triton

        return topk_pack_triton(x.contiguous(), k)
    return topk_pack_ref(x, k)


def topk_scatter_add(out: torch.Tensor, payloads: torch.Tensor) -> torch.Tensor:
    """Public op of :func:`topk_scatter_add_ref`."""
    check_dtype(out, torch.float32, "topk_scatter_add", "out")
    check_dtype(payloads, torch.int32, "topk_scatter_add", "payloads")
    if out.dim() != 1 or payloads.shape[-1] % 2:
        raise ValueError("topk_scatter_add: out must be 1-D and payload rows of even length [values | indices]")
    check_same_device("topk_scatter_add", out, payloads)
    if out.is_contiguous() and use_triton(out):
        from distcomp.kernels.topk_triton import topk_scatter_add_triton

        return topk_scatter_add_triton(out, payloads)
    return topk_scatter_add_ref(out, payloads)
