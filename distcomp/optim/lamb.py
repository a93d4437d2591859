"""1-bit LAMB (Li et al., 2021, arXiv:2104.06069): LAMB with compressed momentum and frozen trust ratios.

Phases, from the step counter ``t`` (0-based):

* ``t < freeze_step`` (warm-up): LAMB on the exactly averaged gradient. Each
  tensor's update ``u = m_hat / (sqrt(v_hat) + eps) + wd x`` is scaled by its
  trust ratio ``||x|| / ||u||`` clipped to ``[min_coeff, max_coeff]``, and an
  exponential average of that ratio (``coeff_beta``) is kept: it is the frozen
  coefficient of the next phase. The last warm-up step copies ``v`` into a
  fresh variance that keeps being updated.
* ``t >= freeze_step`` (compression): momenta are scaled per tensor to a common
  magnitude (scales fixed at the first compressed step), averaged with the 1-bit
  all-reduce with error feedback, and scaled back. The gradient is
  reconstructed from the change of the averaged momentum and updates the fresh
  variance; the frozen coefficient is multiplied by a factor that tracks
  ``max(frozen denominator / fresh denominator)``, clipped to
  ``[factor_min, factor_max]`` and to a change of ``factor_threshold`` per step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from distcomp.optim.base import CompressedOptimizer, GradientMode
from distcomp.optim.config import OptimizerConfig
from distcomp.optim.functional import (
    adam_denominator,
    adam_moments_,
    bias_correction,
    ema,
    lamb_frozen_factor,
    lamb_trust_ratio,
    momentum_scaling,
    rms,
)
from distcomp.optim.layout import FlatLayout
from distcomp.validation import require

Phase = Literal["warmup", "compressed"]


class OneBitLamb(CompressedOptimizer):
    """1-bit LAMB: exact LAMB for ``freeze_step`` steps, then frozen trust ratios and momentum exchanged as signs.

    ``OneBitLamb(model.parameters(), lr=1e-3, freeze_step=400)``; with DDP add
    ``distcomp.optim.register(ddp_model, opt)``. Per-parameter scalars
    ``lamb_coeff_freeze``, ``last_factor`` and ``scaling_coeff`` are part of ``state``.
    """

    algorithm = "OneBitLamb"
    element_keys = ("exp_avg", "exp_avg_sq", "worker_error", "exp_avg_sq_fresh")
    scalar_keys = ("lamb_coeff_freeze", "last_factor", "scaling_coeff")
    lowbit_keys = {**CompressedOptimizer.lowbit_keys, "exp_avg_sq_fresh": "variance"}

    @dataclass(kw_only=True, frozen=True)
    class Config(OptimizerConfig):
        """Options of :class:`OneBitLamb` (DeepSpeed's key names and defaults)."""

        GROUP_KEYS: ClassVar[tuple[str, ...]] = OptimizerConfig.GROUP_KEYS + ("max_coeff", "min_coeff")

        freeze_step: int = 100000
        """Warm-up steps of exact LAMB before compression starts; ``1 / (1 - coeff_beta)`` should not exceed it."""
        max_coeff: float = 10.0
        """Largest trust ratio in the warm-up."""
        min_coeff: float = 0.01
        """Smallest trust ratio in the warm-up."""
        coeff_beta: float = 0.9
        """Decay rate of the running average of the trust ratio that is frozen after the warm-up."""
        factor_max: float = 4.0
        """Largest factor applied to the frozen trust ratio."""
        factor_min: float = 0.5
        """Smallest factor applied to the frozen trust ratio."""
        factor_threshold: float = 0.1
        """Largest relative change of the factor from one step to the next."""

        def __post_init__(self) -> None:
            super().__post_init__()
            require(self.freeze_step >= 1, "freeze_step", f"must be >= 1, got {self.freeze_step}")
            require(
                0 < self.min_coeff <= self.max_coeff,
                "min_coeff",
                f"must be > 0 and <= max_coeff, got {self.min_coeff} and {self.max_coeff}",
            )
            require(0.0 <= self.coeff_beta < 1.0, "coeff_beta", f"must be in [0, 1), got {self.coeff_beta}")
            require(
                0 < self.factor_min <= 1.0 <= self.factor_max,
                "factor_min",
                f"need 0 < factor_min <= 1 <= factor_max, got {self.factor_min} and {self.factor_max}",
            )
            require(self.factor_threshold >= 0, "factor_threshold", f"must be >= 0, got {self.factor_threshold}")

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, **kwargs: Any) -> None:
        super().__init__(params, lr, **kwargs)
        self.lamb_coeffs: list[float] = []
        """The trust ratio applied to each tensor in the last step."""

    config: Config

    def phase(self, t: int | None = None) -> Phase:
        """Phase of step ``t`` (default: the next step)."""
        return "warmup" if (self._step if t is None else t) < self.config.freeze_step else "compressed"

    def _milestones(self) -> dict[int, str]:
        return {self.config.freeze_step: "warm-up done; trust ratios and variance frozen, momentum compressed to 1 bit"}

    def gradient_mode(self, t: int | None = None) -> GradientMode:
        return "mean" if self.phase(t) == "warmup" else "local"

    def get_lamb_coeffs(self) -> list[float]:
        """DeepSpeed's accessor: the trust ratios of the last step."""
        return list(self.lamb_coeffs)

    def momentum_scale(self, param: torch.Tensor) -> float:
        """What the momentum of ``param`` is multiplied by before the 1-bit exchange (FSDP's reduce-scatter asks)."""
        return float(self.state[param].get("scaling_coeff", 1.0))

    def _run(self, t: int, grads: list[torch.Tensor], health: torch.Tensor) -> bool:
        if self.comm.sharded:
            return self._run_sharded(t, grads, health)
        layouts = self.flat.layouts
        coeffs: list[float] = []
        if self.phase(t) == "warmup":
            if not self.comm.exact_mean(grads, health):
                return False
            for layout, g in zip(layouts, grads):
                coeffs += self._warmup_step(layout, t, g)
        else:
            if t == self.config.freeze_step:
                self._set_scaling()
            for layout, g in zip(layouts, grads):
                mean = self.comm.compressed_mean(layout, self._exchange_value(t, layout, g), health)
                if mean is None:
                    return False
                coeffs += self._take_mean(t, layout, mean, g)
        self.lamb_coeffs = coeffs
        return True

    def _warmup_step(self, layout: FlatLayout, t: int, g: torch.Tensor) -> list[float]:
        group, c = self.param_groups[layout.group], self.config
        b1, b2 = group["betas"]
        m, v = self.flat.buffer(layout, "exp_avg"), self.flat.buffer(layout, "exp_avg_sq")
        adam_moments_(m, v, g, b1, b2)
        update, _ = self._update(layout, g, t + 1, t + 1)
        coeffs = []
        for p, wn, un in zip(layout.params, _norms(layout.params), _norms(layout.views(update))):
            st = self.state[p]
            st.setdefault("last_factor", 1.0)
            ratio = lamb_trust_ratio(wn, un, group["min_coeff"], group["max_coeff"])
            if ratio is not None:
                st["lamb_coeff_freeze"] = ema(st.get("lamb_coeff_freeze", 0.0), ratio, c.coeff_beta)
            st.setdefault("lamb_coeff_freeze", 0.0)
            coeffs.append(1.0 if ratio is None else ratio)
        if t == c.freeze_step - 1:
            self.flat.buffer(layout, "exp_avg_sq_fresh").copy_(v)
        self._apply(layout, update, coeffs)
        return coeffs

    def _set_scaling(self) -> None:
        """Per-tensor momentum scales, fixed at the first compressed step from every bucket's momentum."""
        owners = [p for layout in self.flat.layouts for p in layout.owners]
        moments = [
            v for layout in self.flat.layouts for v in layout.views(self.flat.buffer(layout, "exp_avg", write=False))
        ]
        norms = self._global_norms(_norms(moments)) if self.comm.sharded else _norms(moments)
        for p, scale in zip(owners, momentum_scaling([rms(n, p.numel()) for p, n in zip(owners, norms)])):
            self.state[p]["scaling_coeff"] = scale

    # -- FSDP: each rank holds a shard of every tensor, so per-tensor norms are summed over ranks --------

    def _global_norms(self, local_norms: list[float]) -> list[float]:
        """Norms of whole tensors from the norms of this rank's shards of them (one all-reduce)."""
        if not local_norms:
            return []
        squares = torch.tensor(local_norms, dtype=torch.float64).square()
        return self.comm.all_reduce_values(squares).sqrt().tolist()

    def _run_sharded(self, t: int, grads: list[torch.Tensor], health: torch.Tensor) -> bool:
        """LAMB on FSDP shards: the same steps, with every per-tensor norm and maximum taken over all shards."""
        layouts = self.flat.layouts
        if self.phase(t) == "warmup":
            if not self.comm.exact_mean(grads, health):
                return False
            coeffs = self._sharded_warmup(t, grads)
            if t == self.config.freeze_step - 1:  # the reduce-scatters of the next step scale by these
                self._set_scaling()
        else:
            finite = self.comm.agree(health)
            self.comm.fsdp.commit_momentum(finite)  # type: ignore[union-attr]
            if not finite:
                return False
            coeffs = self._sharded_compressed(t, grads)
        for layout, g, c in zip(layouts, grads, _split(coeffs, layouts)):
            self._apply(layout, g, c)
        self.lamb_coeffs = coeffs
        return True

    def _sharded_warmup(self, t: int, grads: list[torch.Tensor]) -> list[float]:
        """Moments and updates (into ``grads``) of every bucket, then the trust ratios from global norms."""
        layouts, c = self.flat.layouts, self.config
        for layout, g in zip(layouts, grads):
            b1, b2 = self.param_groups[layout.group]["betas"]
            adam_moments_(self.flat.buffer(layout, "exp_avg"), self.flat.buffer(layout, "exp_avg_sq"), g, b1, b2)
            self._update(layout, g, t + 1, t + 1)
            if t == c.freeze_step - 1:
                self.flat.buffer(layout, "exp_avg_sq_fresh").copy_(self.flat.buffer(layout, "exp_avg_sq"))
        params = [v for layout in layouts for v in layout.params]
        updates = [v for layout, g in zip(layouts, grads) for v in layout.views(g)]
        norms = self._global_norms(_norms(params) + _norms(updates))
        coeffs = []
        for i, (layout, p) in enumerate(_owners(layouts)):
            group, st = self.param_groups[layout.group], self.state[p]
            st.setdefault("last_factor", 1.0)
            ratio = lamb_trust_ratio(norms[i], norms[len(params) + i], group["min_coeff"], group["max_coeff"])
            if ratio is not None:
                st["lamb_coeff_freeze"] = ema(st.get("lamb_coeff_freeze", 0.0), ratio, c.coeff_beta)
            st.setdefault("lamb_coeff_freeze", 0.0)
            coeffs.append(1.0 if ratio is None else ratio)
        return coeffs

    def _sharded_compressed(self, t: int, grads: list[torch.Tensor]) -> list[float]:
        """The frozen-ratio step: ``grads`` hold the averaged gradient the new momentum implies."""
        layouts, c = self.flat.layouts, self.config
        ratios: list[torch.Tensor] = []
        prelims: list[float] = []
        updates: list[torch.Tensor] = []
        for layout, g in zip(layouts, grads):
            group = self.param_groups[layout.group]
            b2 = group["betas"][1]
            fresh = self.flat.buffer(layout, "exp_avg_sq_fresh")
            fresh.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = self._denominator(layout, c.freeze_step, frozen=True)
            bc2 = bias_correction(b2, t + 1, group["bias_correction"])
            ratio = adam_denominator(fresh, bc2, group["eps"], c.eps_inside_sqrt, out=self._scratch("rebuilt", layout))
            ratios += _local_max(layout.views(torch.div(denom, ratio, out=ratio)))
            prelims += self._update(layout, g, t + 1, c.freeze_step, denom)[1]
            updates += layout.views(g)
        ratio_max = self.comm.all_reduce_values(torch.stack(ratios).double(), op="max").tolist()
        norms = self._global_norms(prelims + _norms(updates))
        n = len(updates)
        coeffs = []
        for i, (layout, p) in enumerate(_owners(layouts)):
            group, st = self.param_groups[layout.group], self.state[p]
            st["last_factor"] = lamb_frozen_factor(
                ratio_max[i],
                norms[i],
                norms[n + i],
                group["weight_decay"],
                st["last_factor"],
                c.factor_min,
                c.factor_max,
                c.factor_threshold,
            )
            coeffs.append(st["lamb_coeff_freeze"] * st["last_factor"])
        return coeffs

    def _overlaps(self, t: int) -> bool:
        # The first compressed step fixes the momentum scales from every bucket first: it runs in step().
        return self.phase(t) == "compressed" and t != self.config.freeze_step

    def _exchanged_step(self, t: int, means: list[torch.Tensor]) -> None:
        self.lamb_coeffs = [
            c for layout, mean in zip(self.flat.layouts, means) for c in self._take_mean(t, layout, mean)
        ]

    def _exchange_value(self, t: int, layout: FlatLayout, g: torch.Tensor) -> torch.Tensor:
        """This rank's momentum, each tensor's scaled to the common magnitude, written into ``g``."""
        b1 = self.param_groups[layout.group]["betas"][0]
        local = torch.lerp(self.flat.buffer(layout, "exp_avg", write=False), g, 1 - b1, out=g)
        torch._foreach_mul_(layout.views(local), self._scales(layout))
        return local

    def _scales(self, layout: FlatLayout) -> list[float]:
        return [self.state[p]["scaling_coeff"] for p in layout.params]

    def _take_mean(
        self, t: int, layout: FlatLayout, mean: torch.Tensor, out: torch.Tensor | None = None
    ) -> list[float]:
        """The frozen-ratio step from the averaged scaled momentum; returns the bucket's trust ratios.

        ``out`` (bucket-sized scratch, default ``mean``) receives the update once ``mean`` is used up.
        """
        group, c = self.param_groups[layout.group], self.config
        b1, b2 = group["betas"]
        out = mean if out is None else out
        m = self.flat.buffer(layout, "exp_avg")
        torch._foreach_div_(layout.views(mean), self._scales(layout))
        fresh = self.flat.buffer(layout, "exp_avg_sq_fresh")
        rebuilt = torch.mul(m, b1, out=self._scratch("rebuilt", layout))
        torch.sub(mean, rebuilt, out=rebuilt).div_(1 - b1)  # the averaged gradient this momentum step implies
        fresh.mul_(b2).addcmul_(rebuilt, rebuilt, value=1 - b2)
        m.copy_(mean)
        denom = self._denominator(layout, c.freeze_step, frozen=True)
        ratio = adam_denominator(
            fresh, bias_correction(b2, t + 1, group["bias_correction"]), group["eps"], c.eps_inside_sqrt, out=rebuilt
        )
        ratio = torch.div(denom, ratio, out=rebuilt)
        ratio_max = torch.stack(torch._foreach_max(layout.views(ratio))).tolist()
        update, prelim = self._update(layout, out, t + 1, c.freeze_step, denom)
        coeffs = []
        for p, rmax, pn, un in zip(layout.params, ratio_max, prelim, _norms(layout.views(update))):
            st = self.state[p]
            st["last_factor"] = lamb_frozen_factor(
                rmax, pn, un, group["weight_decay"], st["last_factor"], c.factor_min, c.factor_max, c.factor_threshold
            )
            coeffs.append(st["lamb_coeff_freeze"] * st["last_factor"])
        self._apply(layout, update, coeffs)
        return coeffs

    def _update(
        self,
        layout: FlatLayout,
        out: torch.Tensor,
        s: int,
        v_updates: int,
        denom: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[float]]:
        """``(m_hat / (sqrt(v_hat) + eps) + wd x`` written into ``out``, the per-tensor norms before the decay term)."""
        group = self.param_groups[layout.group]
        denom = self._denominator(layout, v_updates) if denom is None else denom
        update = torch.div(self.flat.buffer(layout, "exp_avg"), denom, out=out)
        bc1 = bias_correction(group["betas"][0], s, group["bias_correction"])
        if bc1 != 1.0:
            update.div_(bc1)
        wd = group["weight_decay"]
        prelim = _norms(layout.views(update)) if wd else [0.0] * len(layout.params)
        if wd:
            torch._foreach_add_(layout.views(update), list(layout.params), alpha=wd)
        return update, prelim

    def _apply(self, layout: FlatLayout, update: torch.Tensor, coeffs: Sequence[float]) -> None:
        """``x -= lr * coeff * update`` per tensor."""
        views = layout.views(update)
        torch._foreach_mul_(views, list(coeffs))
        torch._foreach_add_(list(layout.params), views, alpha=-self.param_groups[layout.group]["lr"])


def _owners(layouts: Sequence[FlatLayout]) -> list[tuple[FlatLayout, torch.Tensor]]:
    """Every parameter with its bucket, bucket after bucket (the order of the per-tensor norm lists)."""
    return [(layout, p) for layout in layouts for p in layout.owners]


def _local_max(views: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each view's maximum; -inf for a rank's empty shard (a tensor with fewer rows than ranks)."""
    full = [v for v in views if v.numel()]
    maxima = iter(torch._foreach_max(full) if full else [])
    return [next(maxima) if v.numel() else torch.tensor(float("-inf"), device=v.device) for v in views]


def _split(values: list[float], layouts: Sequence[FlatLayout]) -> list[list[float]]:
    """``values`` (one per parameter, bucket after bucket) cut into one list per bucket."""
    out, start = [], 0
    for layout in layouts:
        out.append(values[start : start + len(layout.params)])
        start += len(layout.params)
    return out


def _norms(tensors: Sequence[torch.Tensor]) -> list[float]:
    """L2 norms, accumulated in fp32 whatever the dtype."""
    return torch.stack(torch._foreach_norm(list(tensors), 2, dtype=torch.float32)).tolist()
