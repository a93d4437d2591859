"""Training tasks that run inside spawned ranks for the DDP integration tests.

A tiny byte-level GPT on the text that ships with Python (``pydoc_data``), with
several DDP buckets. Every function here is module-level so that spawned
processes can import it.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import distcomp
from distcomp.models.gpt import GPT, GPTConfig

TINY = GPTConfig(d_model=32, n_layer=2, n_head=2, context=32)
BUCKET_MB = 0.02  # ~5k fp32 values: the tiny GPT spreads over about 8 buckets


@dataclass(frozen=True, kw_only=True)
class Run:
    """One training run inside the ranks."""

    compressor: str | None = "none"
    """distcomp compressor, or None for DDP's own all-reduce."""
    options: dict[str, Any] = field(default_factory=dict)
    steps: int = 30
    overlap: bool = True
    lr: float = 3e-3
    find_unused: bool = False
    accumulate: int = 1
    """Micro-batches per step; all but the last run under ``no_sync()``."""
    save_at: int | None = None
    """Save a checkpoint (into ``ckpt_dir``) after this many steps."""
    resume: bool = False
    """Start from the checkpoint in ``ckpt_dir`` instead of step 0."""
    ckpt_dir: str = ""
    single_file: bool = False
    """Checkpoint as frameworks do: rank 0 writes one file (compression gathered by distcomp.state_dict)."""
    restore_compression: bool = True
    """On resume, restore the compression state too (False: the resumed-without-state case)."""
    inf_at: int | None = None
    """Put an inf into rank 1's gradient at this step."""


def corpus() -> torch.Tensor:
    from pydoc_data.topics import topics

    return torch.tensor(list("".join(topics.values()).encode("utf-8")[:200_000]), dtype=torch.long)


def batch(data: torch.Tensor, rank: int, step: int, micro: int = 0, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch that depends only on (rank, step, micro): resumable without saving a sampler."""
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    starts = torch.randint(0, data.numel() - TINY.context - 1, (size,), generator=g)
    idx = torch.stack([data[s : s + TINY.context + 1] for s in starts.tolist()])
    return idx[:, :-1], idx[:, 1:]


def digest(model: nn.Module) -> str:
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


def build(run: Run, group: dist.ProcessGroup | None = None) -> tuple[GPT, DDP, Any]:
    torch.manual_seed(0)
    model = GPT(TINY)
    ddp = DDP(model, bucket_cap_mb=BUCKET_MB, find_unused_parameters=run.find_unused, process_group=group)
    state = None
    if run.compressor is not None:
        state = distcomp.register(ddp, run.compressor, overlap=run.overlap, **run.options)
    return model, ddp, state


def train(rank: int, world_size: int, run: Run) -> dict[str, Any]:
    """Train ``run``; return losses, per-step parameter digests and the final stats."""
    data = corpus()
    model, ddp, state = build(run)
    opt = torch.optim.AdamW(ddp.parameters(), lr=run.lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=10**6)
    start = 0
    if run.resume:
        start = _resume(run, rank, model, ddp, opt, state)
    losses, digests, skipped = [], [], []
    caught = warnings.catch_warnings(record=True)
    seen = caught.__enter__()
    warnings.simplefilter("always")
    for step in range(start, run.steps):
        opt.zero_grad(set_to_none=True)
        for micro in range(run.accumulate):
            x, y = batch(data, rank, step, micro)
            last = micro == run.accumulate - 1
            with ddp.no_sync() if not last else _nullcontext():
                _, loss = ddp(x, y)
                if run.inf_at == step and rank == 1 and last:
                    loss = loss * float("inf")
                scaler.scale(loss / run.accumulate).backward()
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped.append(scaler.get_scale() < before)
        losses.append(loss.item())
        digests.append(digest(model))
        if run.save_at == step + 1:
            _save(run, rank, model, ddp, opt, state, step + 1)
    caught.__exit__(None, None, None)
    out = {"losses": losses, "digests": digests, "skipped": skipped, "warnings": [str(w.message) for w in seen]}
    if state is not None:
        out["stats"] = state.stats()
        out["compression_state"] = state.state_dict()
        state.close()
    return out


def _save(run: Run, rank: int, model: nn.Module, ddp: DDP, opt: Any, state: Any, step: int) -> None:
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}
    if not run.single_file:
        torch.save({**ckpt, "compression": state.state_dict()}, os.path.join(run.ckpt_dir, f"rank{rank}.pt"))
        return
    ckpt["compression"] = distcomp.state_dict(ddp)  # on every rank: it gathers to rank 0
    if rank == 0:
        torch.save(ckpt, os.path.join(run.ckpt_dir, "single.pt"))
    dist.barrier()


def _resume(run: Run, rank: int, model: nn.Module, ddp: DDP, opt: Any, state: Any) -> int:
    name = "single.pt" if run.single_file else f"rank{rank}.pt"
    ckpt = torch.load(os.path.join(run.ckpt_dir, name), weights_only=True)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    if run.restore_compression and run.single_file:
        distcomp.load_state_dict(ddp, ckpt["compression"])
    elif run.restore_compression:
        state.load_state_dict(ckpt["compression"])
    return ckpt["step"]


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def train_many(rank: int, world_size: int, runs: list[Run]) -> list[dict[str, Any]]:
    """Several runs one after another in the same ranks (saves process start-up time)."""
    return [train(rank, world_size, run) for run in runs]


def one_bad_bucket(rank: int, world_size: int, run: Run, param: str) -> dict[str, Any]:
    """Train ``run`` with rank 1's gradient of ``param`` alone (one bucket) made non-finite at step ``run.inf_at``.

    Returns the compressor state before each step and after the last, and which steps the scaler skipped.
    """
    data = corpus()
    model, ddp, state = build(run)
    opt = torch.optim.AdamW(ddp.parameters(), lr=run.lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=10**6)
    target = dict(model.named_parameters())[param]
    states, skipped = [state.state_dict()["compressor"]], []
    for step in range(run.steps):
        bad = target.register_hook(lambda g: g * float("inf")) if step == run.inf_at and rank == 1 else None
        opt.zero_grad(set_to_none=True)
        x, y = batch(data, rank, step)
        scaler.scale(ddp(x, y)[1]).backward()
        if bad is not None:
            bad.remove()
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped.append(scaler.get_scale() < before)
        states.append(state.state_dict()["compressor"])
    stats = state.stats()
    state.close()
    return {"states": states, "skipped": skipped, "buckets": stats["step"]["buckets"],
            "nonfinite_steps": stats["total"]["nonfinite_steps"]}


def one_bad_bucket_many(rank: int, world_size: int, runs: list[Run], param: str) -> list[dict[str, Any]]:
    """:func:`one_bad_bucket` for several runs in the same ranks."""
    return [one_bad_bucket(rank, world_size, run, param) for run in runs]


def mismatched_register(rank: int, world_size: int) -> str:
    """Rank 1 asks for another PowerSGD rank than the others; every rank must raise."""
    torch.manual_seed(0)
    ddp = DDP(GPT(TINY), bucket_cap_mb=BUCKET_MB)
    try:
        distcomp.register(ddp, "powersgd", rank=8 if rank == 1 else 4)
    except distcomp.RankMismatchError as exc:
        return str(exc)
    return "no error"


def dtype_run(rank: int, world_size: int, compressor: str, dtype_name: str, steps: int) -> dict[str, Any]:
    """An MLP whose parameters are fp16/bf16/fp32: replicas agree and stay finite."""
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 8)).to(dtype)
    ddp = DDP(net, bucket_cap_mb=0.03)
    state = distcomp.register(ddp, compressor)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(rank)
    teacher = torch.Generator().manual_seed(99)
    w_true = torch.randn(64, 8, generator=teacher)
    losses, digests = [], []
    for _ in range(steps):
        x = torch.randn(32, 64, generator=g)
        loss = ((ddp(x.to(dtype)).float() - x @ w_true) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        digests.append(digest(net))
    state.close()
    return {"losses": losses, "digests": digests, "buckets": state.stats()["step"]["buckets"]}


def dtype_runs(rank: int, world_size: int, cases: list[tuple[str, str]], steps: int) -> list[dict[str, Any]]:
    """:func:`dtype_run` for each ``(compressor, dtype)`` in turn, in one job."""
    return [dtype_run(rank, world_size, compressor, dtype, steps) for compressor, dtype in cases]


def dead_peer(rank: int, world_size: int, overlap: bool) -> str:
    """Rank 1 dies at step 3; the survivor must get an error from backward, not hang."""
    data = corpus()
    _, ddp, state = build(Run(compressor="powersgd", overlap=overlap))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    try:
        for step in range(8):
            if step == 3 and rank == 1:
                os._exit(17)
            x, y = batch(data, rank, step)
            opt.zero_grad()
            ddp(x, y)[1].backward()
            opt.step()
    except Exception as exc:  # noqa: BLE001 - the point of the test
        return f"raised {type(exc).__name__}: {exc}"
    return "finished without error"


def worker_group_timeout(rank: int, world_size: int) -> float:
    """The communication worker's own process group inherits the job's collective timeout."""
    from distcomp.hooks.ddp import group_timeout

    torch.manual_seed(0)
    _, _, state = build(Run(compressor="sign", overlap=True))
    seconds = group_timeout(state._comm_group).total_seconds()
    state.close()
    return seconds
