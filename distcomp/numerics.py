"""Numerics every layer shares: the health word that carries non-finite inputs, an L2 norm that cannot overflow."""

from __future__ import annotations

import math

import torch


def local_health(x: torch.Tensor) -> torch.Tensor:
    """A 1-element fp32 tensor: 0 when ``x`` is finite, NaN when it holds an inf or a NaN.

    Compressors append it to their first payload; summed or gathered over ranks it
    tells every rank whether any rank saw a non-finite gradient, at no extra collective.
    """
    if x.numel() == 0:
        return torch.zeros(1, dtype=torch.float32, device=x.device)
    # min * 0 + max * 0 is NaN exactly when x holds an inf or a NaN. Unlike a sum, which
    # overflows for large finite gradients (a loss scaler's), it is 0 for every finite x.
    low, high = torch.aminmax(x)
    return low.float().mul_(0.0).add_(high.float().mul_(0.0)).reshape(1)


_PLAIN_NORM_MIN = 2.0**-60
"""Below this an fp32 sum of squares may have lost values to underflow."""


def l2_norm(x: torch.Tensor) -> float:
    """The L2 norm of ``x``, finite whenever ``x`` is.

    An fp32 sum of squares overflows once values pass 2^64 (well inside the range
    a loss scaler reaches) and underflows below 2^-75; such norms are recomputed
    in float64, which covers every fp32 value.
    """
    norm = float(torch.linalg.vector_norm(x, dtype=torch.float32))
    if _PLAIN_NORM_MIN < norm < math.inf or x.numel() == 0:
        return norm
    low, high = torch.aminmax(x)
    if float(low) == 0.0 == float(high):
        return 0.0
    return float(torch.linalg.vector_norm(x, dtype=torch.float64))
