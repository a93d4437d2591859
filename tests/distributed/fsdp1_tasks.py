"""Rank functions for tests/distributed/test_fsdp1.py (importable by spawned processes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import MixedPrecision, ShardingStrategy

import distcomp.fsdp
from distcomp.errors import DistcompError


@dataclass(frozen=True)
class Run:
    """One training run of the tiny FSDP1 model."""

    compressor: str | None  # None: plain FSDP1, no comm hook
    options: dict = field(default_factory=dict)
    error_feedback: str = "fp32"
    steps: int = 30
    strategy: str = "FULL_SHARD"
    use_orig_params: bool = False
    reduce_dtype: str | None = None  # MixedPrecision(reduce_dtype=...)
    accumulate: int = 1  # micro-batches per step, all but the last under no_sync()
    save_at: int | None = None
    resume_from: str | None = None
    path: str | None = None


def _model() -> nn.Module:
    torch.manual_seed(0)
    # Flat parameters of 84, 65 and 18 values: the middle one does not divide by 2 ranks (FSDP1 pads it).
    return nn.Sequential(
        nn.Sequential(nn.Linear(6, 12), nn.Tanh()),
        nn.Sequential(nn.Linear(12, 5), nn.Tanh()),
        nn.Linear(5, 3),
    )


def wrap(run: Run, model: nn.Module | None = None) -> FSDP:
    """The two blocks and the root each an FSDP1 unit."""
    model = _model() if model is None else model
    dtype = getattr(torch, run.reduce_dtype) if run.reduce_dtype else None
    kwargs: dict[str, Any] = {
        "device_id": torch.device("cpu"),
        "sharding_strategy": ShardingStrategy[run.strategy],
        "use_orig_params": run.use_orig_params,
        "mixed_precision": MixedPrecision(reduce_dtype=dtype) if dtype is not None else None,
    }
    for i in range(2):
        model[i] = FSDP(model[i], **kwargs)
    return FSDP(model, **kwargs)


def _batch(step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 * step + 100 * micro + rank)
    x = torch.randn(16, 6, generator=gen)
    return x, torch.sin(x[:, :3] * 2) + 0.1 * x[:, 3:]


def _backward(model: FSDP, step: int, micro: int, rank: int, accumulate: int) -> float:
    x, y = _batch(step, micro, rank)
    loss = nn.functional.mse_loss(model(x), y) / accumulate
    loss.backward()
    return loss.item()


def train(rank: int, world_size: int, run: Run) -> dict[str, Any]:
    """Train ``run``; returns the losses (mean over ranks), full parameters, stats and residual names."""
    model = wrap(run)
    state = None
    if run.compressor is not None:
        state = distcomp.fsdp.register(model, run.compressor, error_feedback=run.error_feedback, **run.options)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    start = 0
    if run.resume_from is not None:
        ckpt = torch.load(f"{run.resume_from}-rank{rank}.pt", weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optim"])
        if state is not None:
            state.load_state_dict(ckpt["compression"])
        start = ckpt["step"]
    losses = []
    for step in range(start, run.steps):
        total = 0.0
        with model.no_sync():
            for micro in range(run.accumulate - 1):
                total += _backward(model, step, micro, rank, run.accumulate)
        total += _backward(model, step, run.accumulate - 1, rank, run.accumulate)
        opt.step()
        opt.zero_grad()
        t = torch.tensor([total])
        dist.all_reduce(t)
        losses.append(t.item() / world_size)
        if run.save_at is not None and step + 1 == run.save_at:
            ckpt = {"model": model.state_dict(), "optim": opt.state_dict(), "step": step + 1}
            if state is not None:
                ckpt["compression"] = state.state_dict()
            torch.save(ckpt, f"{run.path}-rank{rank}.pt")
    params = {n: p.clone() for n, p in model.state_dict().items()}
    out: dict[str, Any] = {"losses": losses, "params": params, "stats": None, "residuals": None}
    if state is not None:
        out["stats"] = state.stats()
        out["residuals"] = {n: tuple(t.shape) for n, t in state.state_dict()["residuals"].items()}
    return out


def train_many(rank: int, world_size: int, runs: list[Run]) -> list[dict[str, Any]]:
    """Several trainings in one job (process start-up dominates on a model this small)."""
    return [train(rank, world_size, run) for run in runs]


def errors(rank: int, world_size: int) -> dict[str, str]:
    """The messages of the mistakes a user can make with FSDP1, keyed by mistake."""
    plain = Run("int8")
    attempts: dict[str, Any] = {
        "no_shard": lambda: distcomp.fsdp.register(wrap(Run("int8", strategy="NO_SHARD")), "int8"),
        "replicate_group": lambda: distcomp.fsdp.register(wrap(plain), "int8", replicate_group=dist.group.WORLD),
        "error_feedback": lambda: distcomp.fsdp.register(wrap(plain), "int8", error_feedback="int8"),
        "powersgd": lambda: distcomp.fsdp.register(wrap(plain), "powersgd"),
    }
    inner = _model()
    inner[0] = FSDP(inner[0], device_id=torch.device("cpu"))
    attempts["not_root"] = lambda: distcomp.fsdp.register(inner, "int8")
    after = wrap(plain)
    after(torch.randn(2, 6))
    attempts["after_forward"] = lambda: distcomp.fsdp.register(after, "int8")
    twice = wrap(plain)
    distcomp.fsdp.register(twice, "int8")
    attempts["twice"] = lambda: distcomp.fsdp.register(twice, "int8")
    model = wrap(plain)
    state = distcomp.fsdp.register(model, "int8", start_step=0)
    _backward(model, 0, 0, rank, 1)
    saved = state.state_dict()
    attempts["world_size"] = lambda: state.load_state_dict({**saved, "world_size": world_size + 2})
    attempts["fsdp2_format"] = lambda: state.load_state_dict({**saved, "format": "distcomp.fsdp/1"})
    renamed = {**saved["residuals"], "nope.weight": saved["residuals"]["0.0.weight"]}
    attempts["unknown_param"] = lambda: state.load_state_dict({**saved, "residuals": renamed})
    short = {**saved["residuals"], "0.0.weight": saved["residuals"]["0.0.weight"][:3]}
    attempts["wrong_shape"] = lambda: state.load_state_dict({**saved, "residuals": short})
    out = {}
    for key, attempt in attempts.items():
        try:
            attempt()
        except DistcompError as error:
            out[key] = f"{type(error).__name__}: {error}"
        else:
            out[key] = "no error"
    out["residual_names"] = ",".join(sorted(saved["residuals"]))
    out.update(_nonfinite_step(model, state, saved["residuals"], rank))
    return out


def _nonfinite_step(model: FSDP, state: Any, before: dict[str, torch.Tensor], rank: int) -> dict[str, str]:
    """A step with an inf in rank 1's input: non-finite gradients on every rank, residuals untouched."""
    x, y = _batch(1, 0, rank)
    if rank == 1:
        x[0, 0] = float("inf")
    nn.functional.mse_loss(model(x), y).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    after = state.state_dict()["residuals"]
    return {
        "nonfinite_grads": str(any(not bool(torch.isfinite(g).all()) for g in grads)),
        "residuals_kept": str(all(torch.equal(after[k], v) for k, v in before.items())),
    }
