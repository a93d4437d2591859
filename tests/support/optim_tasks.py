"""Work that runs inside spawned ranks for the compressed-optimizer tests (module-level, so spawn can import it).

The small problem: a two-layer MLP with odd sizes (so buckets need padding)
regressing a fixed teacher; each rank draws its own batch from (rank, step), so
rank gradients differ and the trajectory depends on every step's parameters.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import distcomp.optim as optim

IN, HIDDEN, OUT = 13, 37, 5
OPTIMIZERS = {"OneBitAdam": optim.OneBitAdam, "ZeroOneAdam": optim.ZeroOneAdam, "OneBitLamb": optim.OneBitLamb}
# Small blocks and a small bucket cap: several 1-bit blocks per chunk, three fused buckets.
COMMON = {"block": 32, "bucket_cap_mb": 0.0008}
OPTIONS: dict[str, dict[str, Any]] = {
    "OneBitAdam": {"lr": 0.02, "freeze_step": 4, "weight_decay": 0.01, **COMMON},
    "ZeroOneAdam": {"lr": 0.02, "var_freeze_step": 6, "var_update_scaler": 2, "local_step_scaler": 2,
                    "local_step_clipper": 4, "weight_decay": 0.01, **COMMON},
    "OneBitLamb": {"lr": 0.02, "freeze_step": 4, "weight_decay": 0.01, "coeff_beta": 0.5, **COMMON},
}


def init_params(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    shapes = [(HIDDEN, IN), (HIDDEN,), (OUT, HIDDEN), (OUT,)]
    return [(torch.randn(s, generator=g) * 0.3).to(dtype) for s in shapes]


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    net = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))
    with torch.no_grad():
        for p, v in zip(net.parameters(), init_params()):
            p.copy_(v)
    return net.to(dtype)


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * step + rank)
    x = torch.randn(16, IN, generator=g)
    teacher = torch.Generator().manual_seed(99)
    return x, torch.tanh(x @ torch.randn(IN, OUT, generator=teacher))


def loss_of(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out.float() - y) ** 2).mean()


def grad_fn(rank: int, step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The reference's gradient: the same forward pass as :func:`make_model`'s, at ``params``."""
    ps = [p.detach().clone().requires_grad_(True) for p in params]
    x, y = batch(rank, step)
    out = nn.functional.linear(torch.tanh(nn.functional.linear(x, ps[0], ps[1])), ps[2], ps[3])
    return list(torch.autograd.grad(loss_of(out, y), ps))


def digest(params: Any) -> str:
    flat = torch.cat([p.detach().reshape(-1).float() for p in params])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class Run:
    """One training run inside the ranks."""

    algorithm: str
    options: dict[str, Any] = field(default_factory=dict)
    steps: int = 12
    ddp: bool = False
    """Wrap the model in DDP and ``register`` the optimizer with it."""
    dtype: str = "float32"
    scaler: bool = False
    """Drive the steps through ``torch.amp.GradScaler``."""
    inf_at: int | None = None
    """Make rank 1's loss infinite at this step."""
    save_at: int | None = None
    resume: bool = False
    ckpt_dir: str = ""
    trajectory: bool = True
    """Return every step's parameters (for the reference comparison)."""


def train(rank: int, world_size: int, run: Run) -> dict[str, Any]:
    torch.manual_seed(0)
    net = make_model(getattr(torch, run.dtype))
    model = DDP(net, bucket_cap_mb=0.001) if run.ddp else net
    opt = OPTIMIZERS[run.algorithm](net.parameters(), **{**OPTIONS[run.algorithm], **run.options})
    if run.ddp:
        optim.register(model, opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10**6) if run.scaler else None
    start = 0
    if run.resume:
        ckpt = torch.load(os.path.join(run.ckpt_dir, f"rank{rank}.pt"), weights_only=True)
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start = ckpt["step"]
    out: dict[str, Any] = {"params": [], "digests": [], "losses": [], "skipped": [], "stats": [], "states": []}
    for step in range(start, run.steps):
        x, y = batch(rank, step)
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model(x.to(getattr(torch, run.dtype))), y)
        if run.inf_at == step and rank == 1:
            loss = loss * float("inf")
        before = opt.steps
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        out["skipped"].append(opt.steps == before)
        out["losses"].append(loss.item())
        out["digests"].append(digest(net.parameters()))
        out["stats"].append(opt.stats()["step"])
        if run.trajectory:
            out["params"].append([p.detach().clone() for p in net.parameters()])
        if run.inf_at is not None and abs(step - run.inf_at) <= 1:
            out["states"].append(_state_digest(opt.state_dict()))
        if run.save_at == step + 1:
            torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "step": step + 1},
                       os.path.join(run.ckpt_dir, f"rank{rank}.pt"))
    out["layout"] = opt.bucket_layout()
    out["total"] = opt.stats()["total"]
    if scaler is not None:
        out["scale"] = scaler.get_scale()
    return out


def _state_digest(sd: dict[str, Any]) -> str:
    """A hash of every tensor and number of an optimizer state dict."""
    h = hashlib.sha256()
    for index in sorted(sd["state"]):
        for key in sorted(sd["state"][index]):
            v = sd["state"][index][key]
            h.update(v.float().numpy().tobytes() if torch.is_tensor(v) else repr(v).encode())
    for bucket in sd["distcomp"]["buckets"]:
        if bucket["server_error"] is not None:
            h.update(bucket["server_error"].numpy().tobytes())
        h.update(repr(sorted(bucket["scalars"].items())).encode())
    return h.hexdigest()


def train_many(rank: int, world_size: int, runs: list[Run]) -> list[dict[str, Any]]:
    return [train(rank, world_size, run) for run in runs]


def adamw_ddp(rank: int, world_size: int, steps: int, algorithm_kw: dict[str, Any]) -> dict[str, list[str]]:
    """torch AdamW + DDP against OneBitAdam + DDP + register in its warm-up: digests per step."""
    out = {}
    for name in ("adamw", "onebit"):
        torch.manual_seed(0)
        net = make_model()
        ddp = DDP(net, bucket_cap_mb=0.001)
        if name == "adamw":
            opt: Any = torch.optim.AdamW(net.parameters(), lr=0.02, weight_decay=0.01)
        else:
            opt = optim.OneBitAdam(net.parameters(), lr=0.02, weight_decay=0.01, **algorithm_kw)
            optim.register(ddp, opt)
        digests = []
        for step in range(steps):
            x, y = batch(rank, step)
            opt.zero_grad()
            loss_of(ddp(x), y).backward()
            opt.step()
            digests.append(digest(net.parameters()))
        out[name] = digests
    return out


def load_elsewhere(rank: int, world_size: int, ckpt_dir: str, algorithm: str) -> list[str]:
    """Load rank 0's checkpoint of a 2-rank job here: without and with ``reset_errors``."""
    opt = OPTIMIZERS[algorithm](make_model().parameters(), **OPTIONS[algorithm])
    state = torch.load(os.path.join(ckpt_dir, "rank0.pt"), weights_only=True)["optimizer"]
    results = []
    for reset in (False, True):
        try:
            opt.load_state_dict(state, reset_errors=reset)
            results.append("loaded")
        except Exception as exc:  # noqa: BLE001 - the message is what the test checks
            results.append(f"{type(exc).__name__}: {exc}")
    return results


def mismatched(rank: int, world_size: int) -> str:
    """Rank 1 asks for another freeze_step: every rank must raise at the first step, not hang."""
    net = make_model()
    opt = optim.OneBitAdam(net.parameters(), lr=0.01, freeze_step=3 if rank == 1 else 4)
    x, y = batch(rank, 0)
    loss_of(net(x), y).backward()
    try:
        opt.step()
    except Exception as exc:  # noqa: BLE001
        return str(exc)
    return "no error"


def world() -> tuple[int, int]:
    return dist.get_world_size(), dist.get_rank()


def volume(rank: int, world_size: int, algorithm: str, options: dict[str, Any], steps: int, ddp: bool) -> list[dict]:
    """Per-step stats of a 0.5M-parameter MLP with the default 1-bit block, with or without DDP."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 512))
    model = DDP(net) if ddp else net
    opt = OPTIMIZERS[algorithm](net.parameters(), lr=1e-3, **options)
    if ddp:
        optim.register(model, opt)
    g = torch.Generator().manual_seed(rank)
    stats = []
    for _ in range(steps):
        x = torch.randn(8, 512, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        stats.append({**opt.stats()["step"], "phase": opt.phase(opt.steps - 1)})
    return stats


def calls(rank: int, world_size: int, jobs: list[tuple[Any, tuple]]) -> list[Any]:
    """Several task functions one after another in the same ranks (process start-up dominates small tests)."""
    return [fn(rank, world_size, *args) for fn, args in jobs]
