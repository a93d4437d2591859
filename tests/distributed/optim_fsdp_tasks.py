"""Rank functions for tests/distributed/test_optim_fsdp.py (importable by spawned processes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import distcomp.optim as optim

ALGORITHMS = {"onebit_adam": optim.OneBitAdam, "onebit_lamb": optim.OneBitLamb, "zero_one_adam": optim.ZeroOneAdam}
FREEZE = {"onebit_adam": "freeze_step", "onebit_lamb": "freeze_step", "zero_one_adam": "var_freeze_step"}


@dataclass(frozen=True)
class Spec:
    """One training run on an FSDP2 model."""

    algorithm: str = "onebit_adam"
    """A key of ALGORITHMS."""
    wrapper: str = "fsdp"
    """``fsdp``, or ``ddp`` for the unsharded optimizer on the same model and data."""
    steps: int = 100
    freeze: int = 40
    lr: float = 1e-2
    dtype: str = "float32"
    reduce_dtype: str | None = None
    error_feedback: str = "fp32"
    save_at: int | None = None
    """Save per-rank checkpoints after this many steps into ``path``."""
    resume: bool = False
    """Start from the checkpoint in ``path`` (at ``save_at``) instead of step 0."""
    path: str = ""
    keep: int = 4
    """Steps whose full parameters are returned (the first ``keep``), for step-by-step comparisons."""
    block: int = 32
    """Values per sign scale: small, as the model is (a block mostly of padding would shrink its scale)."""
    state_dtype: str = "fp32"


def model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """A small MLP whose shapes shard unevenly over 2 and 4 ranks (13 and 5 rows; 5 leaves rank 3 empty)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(9, 13), nn.Tanh(), nn.Linear(13, 13), nn.Tanh(), nn.Linear(13, 5)).to(dtype)


def batch(step: int, rank: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch of step ``step``: inputs and a fixed nonlinear teacher's targets."""
    gen = torch.Generator().manual_seed(10_000 * step + rank)
    x = torch.randn(16, 9, generator=gen)
    teacher = torch.Generator().manual_seed(7)
    w1, w2 = torch.randn(9, 11, generator=teacher), torch.randn(11, 5, generator=teacher)
    return x.to(dtype), (torch.tanh(x @ w1) @ w2).to(dtype)


def shard(net: nn.Module, world_size: int, reduce_dtype: str | None) -> nn.Module:
    mesh = init_device_mesh("cpu", (world_size,))
    policy = MixedPrecisionPolicy(reduce_dtype=getattr(torch, reduce_dtype) if reduce_dtype else None)
    for i in (0, 2, 4):
        fully_shard(net[i], mesh=mesh, mp_policy=policy)
    return fully_shard(net, mesh=mesh, mp_policy=policy)


def build(spec: Spec, world_size: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    if spec.wrapper == "ddp":
        net: nn.Module = DistributedDataParallel(model(getattr(torch, spec.dtype)))
    else:
        net = shard(model(getattr(torch, spec.dtype)), world_size, spec.reduce_dtype)
    options = {FREEZE[spec.algorithm]: spec.freeze, "block": spec.block, "state_dtype": spec.state_dtype}
    opt = ALGORITHMS[spec.algorithm](net.parameters(), lr=spec.lr, **options)
    optim.register(net, opt, **({"error_feedback": spec.error_feedback} if spec.wrapper == "fsdp" else {}))
    return net, opt


def train(rank: int, world_size: int, spec: Spec) -> dict[str, Any]:
    """Losses (mean over ranks), the first ``keep`` steps' full parameters, the final ones, and stats."""
    dtype = getattr(torch, spec.dtype)
    net, opt = build(spec, world_size)
    start = 0
    if spec.resume:
        saved = torch.load(f"{spec.path}/rank{rank}.pt", weights_only=False)
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        start = spec.save_at or 0
    losses, early = [], []
    for step in range(start, spec.steps):
        x, y = batch(step, rank, dtype)
        loss = nn.functional.mse_loss(net(x).float(), y.float())
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world_size)
        if step < spec.keep:
            early.append(_full(net))
        if spec.save_at is not None and not spec.resume and step + 1 == spec.save_at:
            torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, f"{spec.path}/rank{rank}.pt")
    out: dict[str, Any] = {"losses": losses, "early": early, "final": _full(net)}
    if isinstance(opt, optim.CompressedOptimizer):
        out["stats"], out["last"] = opt.stats()["total"], opt.stats()["step"]
        out["state_bytes"] = opt.state_bytes()
        if opt.comm.fsdp is not None:
            out["ef_bytes"] = opt.comm.fsdp.ef_bytes()
    return out


def _full(net: nn.Module) -> list[torch.Tensor]:
    """The whole parameters (gathered from the shards under FSDP)."""
    return [p.full_tensor() if isinstance(p, DTensor) else p.detach().clone() for p in net.parameters()]


def train_many(rank: int, world_size: int, specs: list[Spec]) -> list[dict[str, Any]]:
    return [train(rank, world_size, s) for s in specs]


def refusals(rank: int, world_size: int, path: str) -> dict[str, str]:
    """The message of each refused set-up, by case."""
    out: dict[str, str] = {}

    def attempt(name: str, fn: Any) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the message is what the test checks
            out[name] = f"{type(e).__name__}: {e}"

    def sharded() -> nn.Module:
        return shard(model(), world_size, None)

    attempt("zero_one_adam", lambda: optim.register(net := sharded(), optim.ZeroOneAdam(net.parameters())))
    attempt(
        "adam_w_mode",
        lambda: optim.register(net := sharded(), optim.OneBitAdam(net.parameters(), adam_w_mode=False)),
    )
    attempt(
        "no_feedback",
        lambda: optim.register(net := sharded(), optim.OneBitAdam(net.parameters()), error_feedback="none"),
    )
    attempt(
        "fp16_reduce",
        lambda: optim.register(net := shard(model(), world_size, "float16"), optim.OneBitAdam(net.parameters())),
    )
    attempt("ddp_option", lambda: optim.register(nn.Linear(2, 2), optim.OneBitAdam(nn.Linear(2, 2).parameters())))

    def unregistered_load() -> None:
        net, opt = build(Spec(), world_size)
        x, y = batch(0, rank)
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        state = opt.state_dict()
        plain = optim.OneBitAdam(sharded().parameters(), lr=Spec().lr, freeze_step=Spec().freeze, block=Spec().block)
        plain.load_state_dict(state)

    attempt("unregistered_load", unregistered_load)
    return out
