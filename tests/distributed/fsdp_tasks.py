"""Rank functions for tests/distributed/test_fsdp.py (importable by spawned processes)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ReduceOp
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

import distcomp.fsdp
from distcomp.errors import DistcompError
from distcomp.fsdp.modules import ParamSlot
from distcomp.fsdp.reduce_scatter import CompressedReduceScatter
from distcomp.fsdp.register import _make_compressor
from distcomp.fsdp.state import FSDPCompressionState, Unit

OPS = {"avg": ReduceOp.AVG, "sum": ReduceOp.SUM, "premul": ReduceOp.PREMUL_SUM(0.3)}


@dataclass(frozen=True)
class Case:
    """One call pattern of the compressed reduce-scatter."""

    compressor: str
    op: str = "avg"
    dtype: str = "float32"
    shard: int = 37
    options: dict = field(default_factory=dict)
    calls: int = 1
    error_feedback: str = "fp32"


def _state(case: Case, world_size: int, rank: int) -> FSDPCompressionState:
    comp = _make_compressor(case.compressor, {**case.options, "start_step": 0} if case.compressor != "none" else {})
    unit = Unit("u", (ParamSlot("u.weight", 0, case.shard),))
    return FSDPCompressionState(
        nn.Linear(1, 1), comp, [unit], error_feedback=case.error_feedback, world_size=world_size, rank=rank
    )  # type: ignore[arg-type]


def reduce_scatter_cases(rank: int, world_size: int, cases: list[Case]) -> list[dict[str, Any]]:
    """Per case: this rank's input, the mean of its outputs over ``calls`` calls, and FSDP's exact output."""
    out = []
    for i, case in enumerate(cases):
        dtype = getattr(torch, case.dtype)
        gen = torch.Generator().manual_seed(1000 * i + rank)
        x = torch.randn(world_size * case.shard, generator=gen).to(dtype)
        comm = CompressedReduceScatter(_state(case, world_size, rank), "u", 0)
        outputs = []
        for _ in range(case.calls):
            o = torch.empty(case.shard, dtype=dtype)
            comm(o, x.clone(), dist.group.WORLD, OPS[case.op])
            outputs.append(o.float())
        exact = torch.empty(case.shard, dtype=dtype)
        # gloo has no PREMUL_SUM: premultiply and sum, as that op does.
        x_in, op = (x * 0.3, ReduceOp.SUM) if case.op == "premul" else (x.clone(), OPS[case.op])
        dist.reduce_scatter_single(output=exact, input=x_in, op=op)
        out.append({"input": x, "first": outputs[0], "mean": torch.stack(outputs).mean(0), "exact": exact})
    return out


def nonfinite_step(rank: int, world_size: int, compressor: str) -> dict[str, Any]:
    """One finite call, then one with an inf on rank 1 only: every rank's output is non-finite, residuals kept."""
    case = Case(compressor)
    state = _state(case, world_size, rank)
    comm = CompressedReduceScatter(state, "u", 0)
    x = torch.randn(world_size * case.shard, generator=torch.Generator().manual_seed(rank))
    o = torch.empty(case.shard)
    comm(o, x.clone(), dist.group.WORLD, ReduceOp.AVG)
    before = state.state_dict()["residuals"]["u.weight"].clone()
    bad = x.clone()
    if rank == 1:
        bad[3] = float("inf")
    comm(o, bad, dist.group.WORLD, ReduceOp.AVG)
    after = state.state_dict()["residuals"]["u.weight"]
    return {"finite": bool(torch.isfinite(o).all()), "kept": torch.equal(before, after), "stats": state.stats()}


# -- training ----------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One training run of the tiny FSDP2 model."""

    compressor: str | None  # None: plain FSDP2, no custom reduce-scatter
    options: dict = field(default_factory=dict)
    error_feedback: str = "fp32"
    steps: int = 30
    accumulate: int = 1
    save_at: int | None = None
    resume_from: str | None = None
    path: str | None = None
    frozen: bool = False  # freeze the last layer's bias (FSDP reduces no gradient for it)
    reduce_dtype: str | None = None  # a MixedPrecisionPolicy reducing in this dtype
    reshard_after_forward: bool | None = None  # None: fully_shard's default
    checkpoint: str | None = None  # "function": torch.utils.checkpoint in the blocks; "wrapper": checkpoint_wrapper


def _model() -> nn.Module:
    torch.manual_seed(0)
    # 12 rows divide by 2 ranks, 5 and 3 rows do not (FSDP pads those shards).
    return nn.Sequential(
        nn.Sequential(nn.Linear(6, 12), nn.Tanh()),
        nn.Sequential(nn.Linear(12, 5), nn.Tanh()),
        nn.Linear(5, 3),
    )


class _Checkpointed(nn.Module):
    """A block whose forward runs under torch.utils.checkpoint (recomputed in backward)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.inner, x, use_reentrant=False)


def _with_checkpointing(model: nn.Module, how: str | None) -> nn.Module:
    """Wrap the two blocks for activation checkpointing (before fully_shard, as torch documents)."""
    wrap = {None: lambda m: m, "function": _Checkpointed, "wrapper": checkpoint_wrapper}[how]
    for i in range(2):
        model[i] = wrap(model[i])
    return model


def _batch(step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 * step + 100 * micro + rank)
    x = torch.randn(16, 6, generator=gen)
    return x, torch.sin(x[:, :3] * 2) + 0.1 * x[:, 3:]


def train(rank: int, world_size: int, run: Run) -> dict[str, Any]:
    """Train ``run``; returns the losses (mean over ranks), full parameters and stats."""
    mesh = init_device_mesh("cpu", (world_size,))
    model = _with_checkpointing(_model(), run.checkpoint)
    if run.frozen:
        model[2].bias.requires_grad_(False)
    policy = MixedPrecisionPolicy(reduce_dtype=getattr(torch, run.reduce_dtype) if run.reduce_dtype else None)
    for block in model[:2]:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=run.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=run.reshard_after_forward)
    state = None
    if run.compressor is not None:
        state = distcomp.fsdp.register(model, run.compressor, error_feedback=run.error_feedback, **run.options)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    start = 0
    if run.resume_from is not None:
        ckpt = torch.load(f"{run.resume_from}-rank{rank}.pt", weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optim"])
        if state is not None:
            state.load_state_dict(ckpt["compression"])
        start = ckpt["step"]
    losses = []
    for step in range(start, run.steps):
        total = 0.0
        for micro in range(run.accumulate):
            model.set_requires_gradient_sync(micro == run.accumulate - 1)
            x, y = _batch(step, micro, rank)
            loss = nn.functional.mse_loss(model(x), y) / run.accumulate
            loss.backward()
            total += loss.item()
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
    params = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    return {"losses": losses, "params": params, "stats": state.stats() if state is not None else None}


def train_many(rank: int, world_size: int, runs: list[Run]) -> list[dict[str, Any]]:
    """Several trainings in one job (process start-up dominates on a model this small)."""
    return [train(rank, world_size, run) for run in runs]


def errors(rank: int, world_size: int, path: str) -> dict[str, str]:
    """The messages of the mistakes a user can make, keyed by mistake."""
    out: dict[str, str] = {}
    mesh = init_device_mesh("cpu", (world_size,))
    attempts: dict[str, Any] = {"not_fsdp": lambda: distcomp.fsdp.register(_model(), "int8")}
    model = _model()
    fully_shard(model, mesh=mesh)
    attempts["unknown_option"] = lambda: distcomp.fsdp.register(model, "int8", blocksize=64)
    attempts["unknown_compressor"] = lambda: distcomp.fsdp.register(model, "int9")
    attempts["bad_error_feedback"] = lambda: distcomp.fsdp.register(model, "int8", error_feedback="int3")
    attempts["powersgd"] = lambda: distcomp.fsdp.register(model, "powersgd")
    attempts["ranks_disagree"] = lambda: distcomp.fsdp.register(model, "int8" if rank == 0 else "int4")
    state = distcomp.fsdp.register(model, "int8")
    saved = state.state_dict()
    attempts["world_size"] = lambda: state.load_state_dict({**saved, "world_size": world_size + 2})
    other = dataclasses.replace(state.compressor.config, block=64)
    attempts["config"] = lambda: state.load_state_dict({**saved, "config": dataclasses.asdict(other)})
    for key, attempt in attempts.items():
        try:
            attempt()
        except DistcompError as error:
            out[key] = f"{type(error).__name__}: {error}"
        else:
            out[key] = "no error"
    return out
