"""The training cases of ``distcomp check gpu``, run inside one worker process per device and setting.

Each case trains a small byte-level GPT for a few steps through one distcomp
path (a DDP comm hook, a compressed optimizer, FSDP2's compressed
reduce-scatter) and returns its final parameters. The parent process runs the
same cases on the GPU twice (``CUDA_LAUNCH_BLOCKING`` 0 and 1: a stream race
shows as a difference) and on the CPU over gloo (the tested path), then
compares them (:mod:`distcomp.check.compare`). The timing mode measures each
compressor's step time against the same step sending nothing.

    python -m distcomp.check.workload --device cuda --rank 0 --world 1 --store F --out R.pt --cases '[...]'
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import distcomp
from distcomp.models.gpt import GPT, GPTConfig

SMALL = GPTConfig(d_model=64, n_layer=2, n_head=4, context=64)
"""The model the correctness cases train (several DDP buckets, matrices for PowerSGD)."""
STEPS = 6


@dataclass(frozen=True, kw_only=True)
class Case:
    """One training run of the check."""

    name: str
    kind: str = "hook"
    """``ddp`` (no hook: the exact reference), ``hook``, ``optim`` or ``fsdp``."""
    method: str = "none"
    """A compressor name, or a distcomp.optim class name for ``optim``."""
    options: dict[str, Any] = field(default_factory=dict)
    overlap: bool = True
    amp: bool = False
    """Autocast to fp16 with a GradScaler (torch.amp), as mixed-precision users train."""


def _setup(device: str, rank: int, world: int, store: str) -> torch.device:
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
        # PowerSGD's products in TF32 would differ from the CPU's fp32 by more than the compression itself.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dist.init_process_group(
        backend, store=dist.FileStore(store, world), rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    return torch.device(device, rank) if device == "cuda" else torch.device("cpu")


def _batch(step: int, rank: int, device: torch.device, cfg: GPTConfig = SMALL) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens that depend only on (step, rank), drawn on the CPU so every device sees the same ones."""
    g = torch.Generator().manual_seed(7919 * step + rank)
    idx = torch.randint(0, cfg.vocab_size, (8, cfg.context + 1), generator=g)
    return idx[:, :-1].to(device), idx[:, 1:].to(device)


def _wrap(case: Case, model: torch.nn.Module, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The distributed model and its optimizer, with the case's distcomp path registered."""
    ids = [device.index] if device.type == "cuda" else None
    if case.kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:  # type: ignore[union-attr]
            fully_shard(block)
        fully_shard(model)
        distcomp.fsdp.register(model, case.method, **case.options)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)
    ddp = DDP(model, device_ids=ids, bucket_cap_mb=0.05)
    if case.kind == "optim":
        cls = getattr(distcomp.optim, case.method)
        opt = cls(ddp.parameters(), lr=1e-3, **case.options)
        distcomp.optim.register(ddp, opt, overlap=case.overlap)
        return ddp, opt
    if case.kind == "hook":
        distcomp.register(ddp, case.method, overlap=case.overlap, **case.options)
    return ddp, torch.optim.AdamW(ddp.parameters(), lr=1e-3)


def train_case(case: Case, device: torch.device, rank: int) -> torch.Tensor:
    """Train ``case`` for :data:`STEPS` steps; the final parameters, flat, fp32, on the CPU."""
    torch.manual_seed(0)
    model = GPT(SMALL).to(device)
    wrapped, opt = _wrap(case, model, device)
    scaler = torch.amp.GradScaler(device.type, enabled=case.amp)
    for step in range(STEPS):
        x, y = _batch(step, rank, device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=case.amp):
            _, loss = wrapped(x, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return torch.cat([p.detach().float().flatten().cpu() for p in params])


def time_case(case: Case, device: torch.device, rank: int, cfg: GPTConfig, steps: int) -> float:
    """Median seconds per step of ``case`` on ``cfg`` (``kind="bound"``: the model alone, nothing sent)."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    wrapped: torch.nn.Module = model
    opt: torch.optim.Optimizer
    if case.kind == "bound":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        wrapped, opt = _wrap(case, model, device)
    times = []
    for step in range(steps + 2):  # two warm-up steps: DDP rebuilds its buckets, Triton compiles
        x, y = _batch(step, rank, device, cfg)
        _sync(device)
        start = time.perf_counter()
        _, loss = wrapped(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times[2:])[len(times[2:]) // 2]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _group(device: str, rank: int, world: int, store: str) -> Iterator[torch.device]:
    dev = _setup(device, rank, world, store)
    try:
        yield dev
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every case of ``args.cases``: ``{name: tensor}`` (train) or ``{name: seconds}`` (time), or an error text."""
    cases = [Case(**c) for c in json.loads(args.cases)]
    out: dict[str, Any] = {}
    with _group(args.device, args.rank, args.world, args.store) as device:
        for case in cases:
            try:
                if args.time:
                    cfg = GPTConfig() if args.device == "cuda" else SMALL
                    out[case.name] = time_case(case, device, args.rank, cfg, args.time)
                else:
                    out[case.name] = train_case(case, device, args.rank)
            except Exception:  # noqa: BLE001 - one failing case is a row of the report, not the end of the run
                out[case.name] = traceback.format_exc(limit=6)
    return out


def main(argv: list[str] | None = None) -> int:
    """The worker's command line (the parent builds it)."""
    p = argparse.ArgumentParser(description="one worker of distcomp check gpu")
    p.add_argument("--device", choices=["cpu", "cuda"], required=True)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--cases", required=True, help="JSON list of Case fields")
    p.add_argument("--time", type=int, default=0, help="time this many steps per case instead of training")
    args = p.parse_args(argv)
    results = run(args)
    if args.rank == 0:
        torch.save(results, args.out)
    return 0


def case_json(cases: list[Case]) -> str:
    """``cases`` as the worker's ``--cases`` argument."""
    return json.dumps([asdict(c) for c in cases])


if __name__ == "__main__":
    raise SystemExit(main())
