"""Work inside spawned ranks for the overlapped-exchange tests: DDP + register, overlap on against off.

The problem is :mod:`optim_tasks`'s MLP; DDP's buckets are tiny (one or two
parameters each, in backward order) and the optimizer's fused buckets are
three (in parameter order), so a fused bucket is completed by several DDP buckets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from optim_tasks import OPTIMIZERS, OPTIONS, batch, digest, loss_of, make_model
from optim_tasks import _state_digest as state_digest
from torch.nn.parallel import DistributedDataParallel as DDP

import distcomp.optim as optim


@dataclass(frozen=True, kw_only=True)
class OverlapRun:
    """One training run with DDP and ``distcomp.optim.register``."""

    algorithm: str
    overlap: bool
    steps: int = 14
    options: dict[str, Any] = field(default_factory=dict)
    inf_at: int | None = None
    """Make rank 1's loss infinite at this step (no GradScaler: the step is skipped everywhere)."""
    clip: float = 0.0
    """Clip the gradient norm between backward and step (the overlapped exchange must notice)."""
    scaler: bool = False
    backward_twice: int | None = None
    """At this step run backward twice before the step (gradients accumulate)."""
    save_at: int | None = None
    resume: bool = False
    ckpt_dir: str = ""


def train(rank: int, world_size: int, run: OverlapRun) -> dict[str, Any]:
    torch.manual_seed(0)
    net = make_model()
    model = DDP(net, bucket_cap_mb=0.001)
    opt = OPTIMIZERS[run.algorithm](net.parameters(), **{**OPTIONS[run.algorithm], **run.options})
    hook = optim.register(model, opt, overlap=run.overlap)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6) if run.scaler else None
    start = 0
    if run.resume:
        ckpt = torch.load(os.path.join(run.ckpt_dir, f"rank{rank}.pt"), weights_only=True)
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start = ckpt["step"]
    out: dict[str, Any] = {"digests": [], "states": [], "skipped": [], "nonfinite": []}
    for step in range(start, run.steps):
        opt.zero_grad(set_to_none=True)
        before = opt.steps
        for _ in range(2 if run.backward_twice == step else 1):
            x, y = batch(rank, step)
            loss = loss_of(model(x), y)
            if run.inf_at == step and rank == 1:
                loss = loss * float("inf")
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if run.clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), run.clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        out["skipped"].append(opt.steps == before)
        out["nonfinite"].append(bool(opt.stats()["step"].get("nonfinite")))
        out["digests"].append(digest(net.parameters()))
        out["states"].append(state_digest(opt.state_dict()))
        if run.save_at == step + 1:
            torch.save(
                {"model": net.state_dict(), "optimizer": opt.state_dict(), "step": step + 1},
                os.path.join(run.ckpt_dir, f"rank{rank}.pt"),
            )
    out["overlapped"] = hook.overlap.steps_overlapped if hook.overlap is not None else 0
    out["still_overlapping"] = hook.overlap is not None and hook.overlap.enabled
    hook.close()
    return out


def train_many(rank: int, world_size: int, runs: list[OverlapRun]) -> list[dict[str, Any]]:
    return [train(rank, world_size, run) for run in runs]
