"""0/1 Adam (Lu et al., 2022, arXiv:2202.06009): adaptive variance freezing and local steps.

Phases, from the step counter ``t`` (0-based; ``s = t + 1``):

* ``t < var_freeze_step`` (variance phase). At the steps of T_v (every step for
  the first ``var_update_scaler`` updates, then every 2nd, 4th, ... step) the
  gradient is averaged exactly and both moments are updated. At the other steps
  the gradient goes through the 1-bit all-reduce (with error feedback) and only
  the momentum is updated. Every step applies the Adam update.
* ``t >= var_freeze_step`` (frozen variance, local steps). The errors restart
  from zero (they now compress a different quantity). Each rank updates its own
  momentum and parameters and accumulates ``u += lr m_hat``; every
  ``interval`` steps (1 at first, doubling every ``local_step_scaler`` steps,
  at most ``local_step_clipper``) the ranks average ``u`` with the 1-bit
  all-reduce, set ``x = anchor * prod(1 - lr wd) - u / denom`` from the
  parameters at the start of the interval, and restart with the momentum
  ``u / sum(lr)``. Steps in between send 4 bytes (a health word, so that a
  non-finite gradient is skipped on every rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from distcomp.errors import CheckpointError, ConfigError
from distcomp.optim.adam import AdamConfig, AdamSteps
from distcomp.optim.base import GradientMode
from distcomp.optim.functional import (
    adam_apply_,
    adam_moments_,
    bias_correction,
    decay_,
    zero_one_is_sync,
    zero_one_variance_step,
    zero_one_variance_updates,
)
from distcomp.optim.layout import FlatLayout
from distcomp.validation import require

Phase = Literal["variance", "compressed-gradient", "local", "sync"]


class ZeroOneAdam(AdamSteps):
    """0/1 Adam: variance updated at doubling intervals, 1-bit exchanges, local steps between synchronisations.

    ``ZeroOneAdam(model.parameters(), lr=1e-3, var_freeze_step=400, local_step_scaler=100)``;
    with DDP add ``distcomp.optim.register(ddp_model, opt)``. Extra state: the
    accumulated update ``momentum_accumulator`` and the interval's starting
    parameters ``anchor`` per parameter, ``lrs`` and ``shrink`` per bucket.
    """

    algorithm = "ZeroOneAdam"
    element_keys = ("exp_avg", "exp_avg_sq", "worker_error", "momentum_accumulator", "anchor")

    @dataclass(kw_only=True, frozen=True)
    class Config(AdamConfig):
        """Options of :class:`ZeroOneAdam` (DeepSpeed's key names and defaults)."""

        var_freeze_step: int = 100000
        """Steps during which the variance may still be updated (the last element of T_v is below it);
        usually the end of the learning-rate warm-up."""
        var_update_scaler: int = 16
        """Variance updates at each interval before the interval doubles (kappa in the paper)."""
        local_step_scaler: int = 32678
        """Frozen-phase steps after which the interval between synchronisations doubles."""
        local_step_clipper: int = 16
        """Largest interval between synchronisations (H in the paper)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            for key in ("var_freeze_step", "var_update_scaler", "local_step_scaler", "local_step_clipper"):
                require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")

    config: Config

    def check_sharded(self) -> None:
        """Refused on FSDP: between synchronisations each rank steps its whole model with its own gradient."""
        raise ConfigError(
            "ZeroOneAdam cannot run on an FSDP model: its local steps update every parameter with this rank's "
            "own momentum between synchronisations, and under FSDP a rank holds only its shard of the parameters. "
            "Use OneBitAdam or OneBitLamb on FSDP, or ZeroOneAdam with DDP"
        )

    def phase(self, t: int | None = None) -> Phase:
        """Phase of step ``t`` (default: the next step)."""
        t = self._step if t is None else t
        c = self.config
        if t < c.var_freeze_step:
            return "variance" if zero_one_variance_step(t + 1, c.var_update_scaler) else "compressed-gradient"
        return "sync" if zero_one_is_sync(t, c.var_freeze_step, c.local_step_scaler, c.local_step_clipper) else "local"

    def _milestones(self) -> dict[int, str]:
        return {self.config.var_freeze_step: "variance frozen; local steps with 1-bit synchronisation from now on"}

    def gradient_mode(self, t: int | None = None) -> GradientMode:
        return "mean" if self.phase(t) == "variance" else "local"

    def _run(self, t: int, grads: list[torch.Tensor], health: torch.Tensor) -> bool:
        phase = self.phase(t)
        if phase in ("variance", "compressed-gradient"):
            return self._variance_phase(t, phase, grads, health)
        if phase == "local" and not self.comm.agree(health):
            return False
        if t == self.config.var_freeze_step:
            self.comm.reset_errors()
            for layout in self.flat.layouts:
                torch._foreach_copy_(layout.views(self.flat.buffer(layout, "anchor")), list(layout.params))
        for layout, g in zip(self.flat.layouts, grads):
            if phase == "local":
                self._l2(layout, g)
                self._local_step(layout, t, g)
                continue
            mean = self.comm.compressed_mean(layout, self._exchange_value(t, layout, g), health)
            if mean is None:
                return False
            self._take_mean(t, layout, mean)
        return True

    def _variance_phase(self, t: int, phase: Phase, grads: list[torch.Tensor], health: torch.Tensor) -> bool:
        exact = phase == "variance"
        if exact and not self.comm.exact_mean(grads, health):
            return False
        v_updates = zero_one_variance_updates(t + 1, self.config.var_update_scaler)
        for layout, g in zip(self.flat.layouts, grads):
            if not exact:
                mean = self.comm.compressed_mean(layout, self._exchange_value(t, layout, g), health)
                if mean is None:
                    return False
                self._take_mean(t, layout, mean)
                continue
            self._l2(layout, g)
            b1, b2 = self.param_groups[layout.group]["betas"]
            adam_moments_(self.flat.buffer(layout, "exp_avg"), self.flat.buffer(layout, "exp_avg_sq"), g, b1, b2)
            self._adam_update(layout, t + 1, v_updates)
        return True

    def _overlaps(self, t: int) -> bool:
        # The first frozen step resets the errors and sets the anchor before its exchange: it runs in step().
        phase = self.phase(t)
        return phase == "compressed-gradient" or (phase == "sync" and t != self.config.var_freeze_step)

    def _exchange_value(self, t: int, layout: FlatLayout, g: torch.Tensor) -> torch.Tensor:
        """What step ``t`` averages, written into ``g``: the gradient (variance phase) or the interval's update."""
        self._l2(layout, g)
        if self.phase(t) == "compressed-gradient":
            return g
        group = self.param_groups[layout.group]
        bc1 = bias_correction(group["betas"][0], t + 1, group["bias_correction"])
        m, u = self.flat.buffer(layout, "exp_avg", write=False), self.flat.buffer(layout, "momentum_accumulator")
        local = torch.lerp(m, g, 1 - group["betas"][0], out=g)
        return torch.add(u, local, alpha=group["lr"] / bc1, out=g)

    def _take_mean(self, t: int, layout: FlatLayout, mean: torch.Tensor) -> None:
        """Step ``t`` from the averaged gradient, or the synchronisation from the averaged update."""
        if self.phase(t) == "sync":
            self._sync_step(layout, t, mean)
            return
        self.flat.buffer(layout, "exp_avg").lerp_(mean, 1 - self.param_groups[layout.group]["betas"][0])
        self._adam_update(layout, t + 1, zero_one_variance_updates(t + 1, self.config.var_update_scaler))

    def _frozen(self, layout: FlatLayout, t: int) -> tuple[float, float, float, dict[str, float]]:
        """``(lr, 1 - lr wd, bc1, the bucket's interval scalars)`` of frozen-phase step ``t``."""
        group = self.param_groups[layout.group]
        lr = group["lr"]
        shrink = 1.0 - lr * group["weight_decay"] if self.config.adam_w_mode else 1.0
        bc1 = bias_correction(group["betas"][0], t + 1, group["bias_correction"])
        scalars = self.flat.scalars.setdefault(layout.index, {"lrs": 0.0, "shrink": 1.0})
        return lr, shrink, bc1, scalars

    def _frozen_denominator(self, layout: FlatLayout) -> torch.Tensor:
        c = self.config
        return self._denominator(layout, zero_one_variance_updates(c.var_freeze_step, c.var_update_scaler), frozen=True)

    def _local_step(self, layout: FlatLayout, t: int, g: torch.Tensor) -> None:
        """Momentum and parameters from this rank's gradient alone; the update is accumulated for the next sync."""
        lr, shrink, bc1, scalars = self._frozen(layout, t)
        m = self.flat.buffer(layout, "exp_avg")
        m.lerp_(g, 1 - self.param_groups[layout.group]["betas"][0])
        self.flat.buffer(layout, "momentum_accumulator").add_(m, alpha=lr / bc1)
        scalars["lrs"] += lr
        scalars["shrink"] *= shrink
        denom = self._frozen_denominator(layout)
        if self.config.adam_w_mode:
            decay_(layout.params, lr, self.param_groups[layout.group]["weight_decay"])
        adam_apply_(layout.params, layout.views(m), layout.views(denom), lr / bc1)

    def _sync_step(self, layout: FlatLayout, t: int, mean: torch.Tensor) -> None:
        """The last step of an interval, from the averaged accumulated updates: restart from the anchor."""
        lr, shrink, bc1, scalars = self._frozen(layout, t)
        m, u = self.flat.buffer(layout, "exp_avg"), self.flat.buffer(layout, "momentum_accumulator")
        lrs, total_shrink = scalars["lrs"] + lr, scalars["shrink"] * shrink
        anchor = self.flat.buffer(layout, "anchor")
        denom = self._frozen_denominator(layout)
        anchor.mul_(total_shrink).addcdiv_(mean, denom, value=-1.0)
        torch._foreach_copy_(list(layout.params), layout.views(anchor))
        torch.mul(mean, bc1 / lrs if lrs else 0.0, out=m)  # lr 0 over the whole interval: no momentum to recover
        u.zero_()
        scalars["lrs"], scalars["shrink"] = 0.0, 1.0

    def _after_load(self, reset_errors: bool) -> None:
        if not reset_errors:
            return
        for layout in self.flat.layouts:
            if self.flat.scalars.get(layout.index, {}).get("lrs", 0.0) != 0.0:
                raise CheckpointError(
                    "ZeroOneAdam: reset_errors needs a checkpoint taken at a synchronisation step: this one is "
                    "inside a local-step interval, where each rank's accumulated update is its own"
                )
