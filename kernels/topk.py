"""Top-k selection into one contiguous payload, and scatter-add of gathered payloads.

A payload is an int32 tensor ``[2k]``: ``k`` fp32 values bit-cast to int32, then
their ``k`` indices. One buffer means one collective per bucket.
"""

from __future__ import annotations

import torch

from distcomp.kernels._checks import check_dtype, check_float


def topk_pack_ref(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` entries of largest magnitude of flat ``x`` as an int32 payload ``[2k]``."""
    flat = x.reshape(-1)
    indices = flat.abs().topk(k, sorted=False).indices
    values = flat[indices].to(torch.float32)
    return torch.cat([values.view(torch.int32), indices.to(torch.int32)])


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
    return topk_pack_ref(x, k)


def topk_scatter_add(out: torch.Tensor, payloads: torch.Tensor) -> torch.Tensor:
    """Public op of :func:`topk_scatter_add_ref`."""
    check_dtype(out, torch.float32, "topk_scatter_add", "out")
    check_dtype(payloads, torch.int32, "topk_scatter_add", "payloads")
    if out.dim() != 1 or payloads.shape[-1] % 2:
        raise ValueError("topk_scatter_add: out must be 1-D and payload rows of even length [values | indices]")
    return topk_scatter_add_ref(out, payloads)
