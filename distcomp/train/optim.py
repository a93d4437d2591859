"""Optimizers the main job offers, and the learning-rate schedule as a pure function of the step."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from distcomp.optim import OneBitAdam, OneBitLamb
from distcomp.train.config import COMPRESSED_OPTIMIZERS, OptimizerConfig


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # Decay matrices only: decaying biases and norm gains hurts and buys nothing.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _adamw(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def _sgd(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        _param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov
    )


OPTIMIZERS: dict[str, Callable[[torch.nn.Module, OptimizerConfig], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "sgd": _sgd,
}
"""Builders of torch's optimizers by ``optimizer.name``; distcomp's compressed ones are in ``COMPRESSED_OPTIMIZERS``."""


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, name: str | None = None) -> torch.optim.Optimizer:
    """The optimizer ``name`` (default ``cfg.name``) over ``model``'s parameters, with ``cfg``'s settings."""
    name = name or cfg.name
    if name in COMPRESSED_OPTIMIZERS:
        config = cfg.compressed_config(name)
        groups = _param_groups(model, config.weight_decay)
        return COMPRESSED_OPTIMIZERS[name](groups, **dataclasses.asdict(config))
    return OPTIMIZERS[name](model, cfg)


def first_compressed_step(cfg: OptimizerConfig, name: str) -> int:
    """The first step at which the optimizer ``name`` compresses (0 for the hooks' runs: each compressor decides)."""
    config = cfg.compressed_config(name) if name in COMPRESSED_OPTIMIZERS else None
    if isinstance(config, (OneBitAdam.Config, OneBitLamb.Config)):
        return config.freeze_step  # 0/1 Adam compresses from its first step
    return 0


def lr_at(cfg: OptimizerConfig, step: int, steps: int, peak: float | None = None) -> float:
    """Learning rate of ``step`` (0-based): linear warm-up, then constant or cosine to ``min_lr_ratio * peak``.

    ``peak`` defaults to ``cfg.lr``; a compressed optimizer with its own ``lr`` passes that.
    """
    peak = cfg.lr if peak is None else peak
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    total = cfg.decay_steps or steps
    span = max(total - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.min_lr_ratio * peak
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr
