"""The math of the compressed optimizers: pure functions of tensors and numbers.

Nothing here communicates or keeps state; the optimizers call these functions
around their collectives, and :mod:`distcomp.optim.reference` restates the same
math loop by loop. Steps are counted two ways: ``t`` is the 0-based index of a
step (the number of steps completed before it) and ``s = t + 1`` the 1-based
count that bias corrections use.

The Adam pieces follow ``torch.optim.AdamW``'s single-tensor code operation for
operation, so a warm-up step is bit-identical to AdamW on the same averaged
gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

# -- Adam ---------------------------------------------------------------------------


def bias_correction(beta: float, updates: int, enabled: bool) -> float:
    """``1 - beta ** updates`` (1.0 when disabled)."""
    return 1.0 - beta**updates if enabled else 1.0


def adam_moments_(m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta1: float, beta2: float) -> None:
    """Both moving averages, in place: ``m = lerp(m, g, 1 - beta1)``, ``v = beta2 v + (1 - beta2) g^2``."""
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)


def adam_denominator(v: torch.Tensor, bc2: float, eps: float, eps_inside_sqrt: bool, out: torch.Tensor) -> torch.Tensor:
    """``sqrt(v / bc2) + eps`` as AdamW computes it, or ``sqrt(v / bc2 + eps)`` (written into ``out``)."""
    if eps_inside_sqrt:
        return torch.div(v, bc2, out=out).add_(eps).sqrt_()
    return torch.sqrt(v, out=out).div_(bc2**0.5).add_(eps)


def decay_(params: Sequence[torch.Tensor], lr: float, weight_decay: float) -> None:
    """Decoupled weight decay ``x *= 1 - lr * weight_decay`` (AdamW's, applied before the step)."""
    if weight_decay:
        torch._foreach_mul_(list(params), 1 - lr * weight_decay)


def adam_apply_(
    params: Sequence[torch.Tensor], m: Sequence[torch.Tensor], denom: Sequence[torch.Tensor], step_size: float
) -> None:
    """``x -= step_size * m / denom`` per parameter; half-precision parameters are updated through fp32."""
    torch._foreach_addcdiv_(list(params), list(m), list(denom), value=-step_size)


# -- 0/1 Adam schedules --------------------------------------------------------------


def _variance_runs(scaler: int) -> Iterator[tuple[int, int, int]]:
    """``(interval, first, last)`` of each run of ``scaler`` variance updates: intervals 1, 2, 4, ...

    The first run updates at steps ``1..scaler``; each later run starts at the
    first multiple of its (doubled) interval after the previous run's last update.
    """
    interval, last = 1, scaler
    yield interval, 1, last
    while True:
        interval *= 2
        first = (last // interval + 1) * interval
        last = first + (scaler - 1) * interval
        yield interval, first, last


def zero_one_variance_step(s: int, scaler: int) -> bool:
    """Whether 1-based step ``s`` of 0/1 Adam's variance phase updates the variance (the set T_v)."""
    for interval, first, last in _variance_runs(scaler):
        if s <= last:
            return s >= first and (s - first) % interval == 0
    raise AssertionError("unreachable: the runs of variance updates never end")


def zero_one_variance_updates(s: int, scaler: int) -> int:
    """How many of the steps ``1..s`` updated the variance (its bias correction counts these)."""
    count = 0
    for interval, first, last in _variance_runs(scaler):
        if s < first:
            return count
        if s <= last:
            return count + (s - first) // interval + 1
        count += scaler
    raise AssertionError("unreachable: the runs of variance updates never end")


def zero_one_local_interval(t: int, var_freeze_step: int, scaler: int, clipper: int) -> int:
    """Steps between synchronisations at frozen-phase step ``t``: doubles every ``scaler`` steps, up to ``clipper``."""
    doublings = (t - var_freeze_step) // scaler
    return min(clipper, 2 ** min(doublings, 62))


def zero_one_is_sync(t: int, var_freeze_step: int, scaler: int, clipper: int) -> bool:
    """Whether frozen-phase step ``t`` ends with a synchronisation (DeepSpeed's ``step % interval == 0``)."""
    return (t + 1) % zero_one_local_interval(t, var_freeze_step, scaler, clipper) == 0


# -- LAMB --------------------------------------------------------------------------


def lamb_trust_ratio(weight_norm: float, update_norm: float, min_coeff: float, max_coeff: float) -> float | None:
    """``||x|| / ||update||`` clipped to ``[min_coeff, max_coeff]``; None when a norm is 0 (then the ratio is 1)."""
    if weight_norm == 0.0 or update_norm == 0.0:
        return None
    return min(max(weight_norm / update_norm, min_coeff), max_coeff)


def momentum_scaling(rms: Sequence[float]) -> list[float]:
    """1-bit LAMB's per-tensor momentum scales: ``mean(rms) / rms`` (1 for a tensor whose momentum is 0).

    Evening out the tensors' magnitudes before they share 1-bit blocks keeps the
    small ones from being drowned by the scale of the large ones.
    """
    live = [r for r in rms if r > 0.0]
    united = sum(live) / len(live) if live else 1.0
    return [united / r if r > 0.0 else 1.0 for r in rms]


def lamb_frozen_factor(
    denom_ratio_max: float,
    prelim_norm: float,
    update_norm: float,
    weight_decay: float,
    last_factor: float,
    factor_min: float,
    factor_max: float,
    factor_threshold: float,
) -> float:
    """1-bit LAMB's scaling of the frozen trust ratio for one tensor in the compression phase.

    ``denom_ratio_max`` is ``max(frozen denominator / fresh denominator)``: how
    much larger the step would be with an up-to-date variance. With weight decay
    the factor only scales the share of the update that comes from the momentum.
    The result is clipped to ``[factor_min, factor_max]`` and may move at most
    ``factor_threshold`` (relative) from ``last_factor``.
    """
    factor = denom_ratio_max
    if weight_decay > 0.0 and update_norm > 0.0:
        share = min(1.0, prelim_norm / update_norm)
        factor = factor * share + (1.0 - share)
    factor = min(max(factor, factor_min), factor_max)
    return min(max(factor, last_factor * (1.0 - factor_threshold)), last_factor * (1.0 + factor_threshold))


def ema(previous: float, value: float, beta: float) -> float:
    """``beta * previous + (1 - beta) * value``."""
    return beta * previous + (1.0 - beta) * value


def rms(norm: float, numel: int) -> float:
    """Root mean square from an L2 norm."""
    return norm / math.sqrt(numel) if numel else 0.0
