"""One training run on one rank: model, DDP with a distcomp hook (or a compressed optimizer) or FSDP2 with a
compressed reduce-scatter, steps, evaluation.

Test hook: ``DISTCOMP_TEST_FAULT=RANK:STEP`` makes rank RANK raise at step STEP,
and ``RANK:STEP:hang`` makes it stop answering, so tests can check that a failed
or silent rank ends the whole job (the latter within ``dist.timeout_s``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import distcomp
import distcomp.fsdp
import distcomp.optim
from distcomp.errors import CheckpointError
from distcomp.models.gpt import GPT
from distcomp.optim.state import local_shards
from distcomp.telemetry import Counters
from distcomp.train import checkpoint
from distcomp.train.config import RunSpec, TrainConfig, config_to_raw
from distcomp.train.data import Corpus, ShardedBatches, val_batches
from distcomp.train.optim import build_optimizer, lr_at, set_lr
from distcomp.train.stop import STOP_SIGNALS, signal_name
from distcomp.train.telemetry import RunMonitor, RunResult, StepRecord, summarize, write_summary

logger = logging.getLogger("distcomp.train")
FAULT_ENV = "DISTCOMP_TEST_FAULT"


@dataclass(frozen=True)
class Placement:
    """Where one rank runs."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


@dataclass(frozen=True, kw_only=True)
class RankContext(Placement):
    """Who this process is in the job, and what it runs on."""

    device: torch.device
    backend: str
    stop_signal: Callable[[], int]
    """The signal that asked this rank to stop (SIGINT, SIGTERM, SIGHUP), 0 while none did.

    The ranks agree on it at the next step."""


@dataclass
class Run:
    """The live objects of one run."""

    model: GPT
    ddp: torch.nn.Module
    """What a step calls: the DDP wrapper, or (``dist.parallel: fsdp``) the sharded model itself."""
    state: Any
    """The compression hook's state (DDP's ``CompressionState`` or FSDP's); None when a compressed
    optimizer communicates (its stats are its own)."""
    optimizer: torch.optim.Optimizer
    batches: ShardedBatches
    val: list[torch.Tensor]
    records: list[StepRecord] = dataclasses.field(default_factory=list)
    val_losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    start: int = 0
    peak_lr: float | None = None
    """Peak of the learning-rate schedule; None: ``optimizer.lr``."""
    sharded: bool = False
    """FSDP: model and optimizer state are sharded, and checkpoints gather them to full state dicts."""

    def counters(self) -> Counters:
        """Bytes and times of the last step, from the hook or from the compressed optimizer (zeros before any)."""
        source = self.state if self.state is not None else self.optimizer
        return source.telemetry.last or Counters()  # type: ignore[union-attr]

    def close(self) -> None:
        if self.state is not None:
            self.state.close()


def build_run(cfg: TrainConfig, spec: RunSpec, ctx: RankContext, corpus: Corpus) -> Run:
    """Model (same initial weights on every rank), DDP, the compression hook or compressed optimizer, data."""
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model).to(ctx.device)
    if cfg.dist.parallel != "ddp":
        return _build_fsdp_run(cfg, spec, ctx, corpus, model)
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=ids)
    optimizer = build_optimizer(model, cfg.optimizer, spec.optimizer)
    if isinstance(optimizer, distcomp.optim.CompressedOptimizer):
        state = None
        # Clipping needs every gradient before the momentum: the exchange can then not start during backward.
        distcomp.optim.register(ddp, optimizer, overlap=cfg.dist.overlap and not cfg.optimizer.grad_clip)
    else:
        state = distcomp.register(ddp, spec.compression, overlap=cfg.dist.overlap)
    batches, val = _data(cfg, ctx, corpus)
    return Run(model, ddp, state, optimizer, batches, val, peak_lr=cfg.optimizer.peak_lr(spec.optimizer))


def _build_fsdp_run(cfg: TrainConfig, spec: RunSpec, ctx: RankContext, corpus: Corpus, model: GPT) -> Run:
    """FSDP2: each GPT block and the model are FSDP units.

    ``fsdp`` shards over all ranks and compresses the reduce-scatter; ``hsdp`` shards over
    groups of ``dist.shard`` ranks (1-D ``fully_shard`` on the shard sub-mesh) and compresses
    the all-reduce across replicas. A compressed optimizer (fsdp only) drives the reduce-scatters
    itself; the config refused what FSDP cannot train before any rank started.
    """
    replicate_group = None
    if cfg.dist.parallel == "hsdp":
        shard = cfg.dist.shard or ctx.local_world_size  # launch.check_mesh made sure it divides the ranks
        grid = init_device_mesh(
            ctx.device.type, (ctx.world_size // shard, shard), mesh_dim_names=("replicate", "shard")
        )
        mesh, replicate_group = grid["shard"], grid.get_group("replicate")
    else:
        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # The optimizer is built on the sharded parameters, so its state is sharded too.
    optimizer = build_optimizer(model, cfg.optimizer, spec.optimizer)
    state = None
    if isinstance(optimizer, distcomp.optim.CompressedOptimizer):  # it drives the reduce-scatters itself
        distcomp.optim.register(model, optimizer)
    else:
        state = distcomp.fsdp.register(model, spec.compression, replicate_group=replicate_group)
    batches, val = _data(cfg, ctx, corpus)
    peak_lr = cfg.optimizer.peak_lr(spec.optimizer)
    return Run(model, model, state, optimizer, batches, val, peak_lr=peak_lr, sharded=True)


def _data(cfg: TrainConfig, ctx: RankContext, corpus: Corpus) -> tuple[ShardedBatches, list[torch.Tensor]]:
    context, batch = cfg.model.context, cfg.data.batch_size
    batches = ShardedBatches(corpus.train, context, batch, ctx.rank, ctx.world_size, cfg.seed)
    return batches, val_batches(corpus.val, context, batch, cfg.eval.batches, ctx.rank, ctx.world_size)


def train_run(
    cfg: TrainConfig, spec: RunSpec, ctx: RankContext, corpus: Corpus, *, run_dir: Path, resume: Path | None, show: bool
) -> tuple[RunResult | None, int]:
    """Train one run to ``cfg.steps``: ``(result, stopped)``.

    ``result`` is rank 0's :class:`RunResult` (``None`` on other ranks); ``stopped``
    is, on every rank, the signal on which the ranks agreed to stop early, 0 when they did not.
    """
    started = time.perf_counter()
    run = build_run(cfg, spec, ctx, corpus)
    if resume is not None:
        _restore(run, resume, ctx)
    monitor = (
        RunMonitor(
            run_dir=run_dir,
            label=spec.name,
            steps=cfg.steps,
            start=run.start,
            progress=cfg.log.progress,
            tensorboard=cfg.log.tensorboard,
            log_every=cfg.log.every,
            fresh=resume is None,
        )
        if show
        else None
    )
    saver = _Saver(cfg, spec, ctx, corpus, resume)
    try:
        loop_s, stopped = _loop(run, cfg, ctx, monitor, saver)
        if monitor:
            monitor.end_progress()
        final = run.records[-1].step + 1 if run.records else run.start
        if not run.val_losses or run.val_losses[-1][0] != final:
            _record_val(run, ctx, final, monitor)
    except BaseException:
        # No process-group teardown here: this rank reports its error and exits, and tearing its groups
        # down first would make the peers fail ("connection reset") before that report is out.
        if monitor:
            monitor.close()
        raise
    run.close()
    if monitor:
        monitor.close()
    if ctx.rank != 0:
        return None, stopped
    result = summarize(
        spec.name,
        run.records,
        params=sum(p.numel() for p in run.model.parameters()),
        val_losses=run.val_losses,
        loop_s=loop_s,
        steps_run=len(run.records) - run.start,
        wall_s=time.perf_counter() - started,
        interrupted=stopped > 0,
    )
    write_summary(run_dir / "summary.json", {"run": result.as_dict(), "config": config_to_raw(cfg)})
    return result, stopped


def _loop(run: Run, cfg: TrainConfig, ctx: RankContext, monitor: RunMonitor | None, saver: _Saver) -> tuple[float, int]:
    """Steps from ``run.start`` to ``cfg.steps``, evaluations, checkpoints: ``(seconds in steps, stop signal)``."""
    loop_s, stopped = 0.0, 0
    for step in range(run.start, cfg.steps):
        tick = time.perf_counter()
        rec, stopped = _step(run, cfg, ctx, step)
        run.records.append(rec)
        if monitor:
            monitor.step(rec)
        loop_s += time.perf_counter() - tick
        done = step + 1
        if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.steps and not stopped:
            _record_val(run, ctx, done, monitor)
        every = cfg.checkpoint.every
        if every and (done % every == 0 or done == cfg.steps or stopped):
            saver.save(run, done)
        if stopped:
            logger.warning("stopped at step %d on %s, as asked", done, signal_name(stopped))
            break
    return loop_s, stopped


class _Saver:
    """Writes this run's checkpoints (collective: every rank calls :meth:`save` at the same step)."""

    def __init__(self, cfg: TrainConfig, spec: RunSpec, ctx: RankContext, corpus: Corpus, resume: Path | None) -> None:
        self.ctx, self.keep = ctx, cfg.checkpoint.keep
        self.root = checkpoint.run_root(cfg, spec)
        # Pruning removes only checkpoints with this id; rank 0's is the one written.
        self.meta = {
            "run_id": _run_id(resume),
            "world_size": ctx.world_size,
            "compressor": spec.name,
            "config": checkpoint.trajectory_config(cfg, spec),
            "data": corpus.fingerprint,
            "schedule_steps": cfg.optimizer.decay_steps or cfg.steps,
        }

    def save(self, run: Run, step: int) -> None:
        model_state = None
        if run.sharded:  # collective: every rank gathers, rank 0 keeps the full weights
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = get_model_state_dict(run.model, options=options)
        checkpoint.save(
            self.root,
            step,
            rank=self.ctx.rank,
            meta=self.meta,
            model=run.model,
            rank_state=_rank_state(run, self.ctx, step),
            keep=self.keep,
            model_state=model_state,
        )


def _run_id(resume: Path | None) -> str:
    """The id of the run a checkpoint resumes (a resume continues that run), else a new one."""
    resumed = checkpoint.run_id_of(resume) if resume is not None else None
    return resumed or uuid.uuid4().hex[:16]


def _step(run: Run, cfg: TrainConfig, ctx: RankContext, step: int) -> tuple[StepRecord, int]:
    """One optimizer step; returns its record and the signal on which the ranks agreed to stop after it (or 0)."""
    _maybe_fault(ctx.rank, step)
    lr = lr_at(cfg.optimizer, step, cfg.steps, run.peak_lr)
    set_lr(run.optimizer, lr)
    x, y = run.batches.batch(step, ctx.device)
    tick = time.perf_counter()
    _, loss = run.ddp(x, y)
    loss.backward()
    if cfg.optimizer.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.optimizer.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    step_s = time.perf_counter() - tick
    # One small all-reduce a step carries the loss for the log and, one slot a signal, the stop requests.
    asked = ctx.stop_signal()
    flags = torch.tensor([float(asked == s) for s in STOP_SIGNALS], device=ctx.device)
    shared = torch.cat([loss.detach().float().reshape(1), flags])
    dist.all_reduce(shared)
    rec = StepRecord(step=step, loss=shared[0].item() / ctx.world_size, lr=lr, step_s=step_s)
    rec.add(run.counters())
    # Every rank sees the same sums, so every rank picks the same signal (and exit code).
    return rec, max((s for s, n in zip(STOP_SIGNALS, shared[1:].tolist()) if n > 0), default=0)


@torch.no_grad()
def evaluate(run: Run, ctx: RankContext) -> float:
    """Mean next-byte loss over the fixed validation windows of every rank."""
    run.model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    for seqs in run.val:
        seqs = seqs.to(device=ctx.device, dtype=torch.long)
        _, loss = run.model(seqs[:, :-1], seqs[:, 1:])
        n = seqs[:, 1:].numel()
        total += torch.tensor([loss.item() * n, n], dtype=torch.float64, device=ctx.device)
    run.model.train()
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


def _record_val(run: Run, ctx: RankContext, step: int, monitor: RunMonitor | None) -> None:
    loss = evaluate(run, ctx)
    run.val_losses.append((step, loss))
    if monitor:
        monitor.val_loss(step, loss)


def _rank_state(run: Run, ctx: RankContext, step: int) -> dict[str, Any]:
    return {
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "optimizer": _optimizer_state(run),
        "compression": run.state.state_dict() if run.state is not None else {},
        "rng": checkpoint.rng_state(ctx.device),
        "data": _data_position(run, step),
        "records": [dataclasses.asdict(r) for r in run.records],
        "val_losses": [list(v) for v in run.val_losses],
    }


def _optimizer_state(run: Run) -> dict[str, Any]:
    """The optimizer's state dict; with FSDP the full one (gathered: collective), keyed by parameter names.

    A compressed optimizer on FSDP keeps its own per-rank format instead: this rank's
    shards (plain tensors) with its worker errors, restored on the same mesh.
    """
    if isinstance(run.optimizer, distcomp.optim.CompressedOptimizer):
        return local_shards(run.optimizer.state_dict())
    if not run.sharded:
        return run.optimizer.state_dict()
    # Full tensors, not this rank's shards, so the file holds plain tensors that load with weights_only.
    options = StateDictOptions(full_state_dict=True)
    return get_optimizer_state_dict(run.model, run.optimizer, options=options)


def _data_position(run: Run, step: int) -> dict[str, int]:
    """Where the batch of ``step`` comes from (a pure function of the step), stored to check it on resume."""
    epoch, batch = run.batches.position(step)
    return {
        "epoch": epoch,
        "batch": batch,
        "steps_per_epoch": run.batches.steps_per_epoch,
        "windows": len(run.batches.windows),
    }


def _restore(run: Run, path: Path, ctx: RankContext) -> None:
    meta = checkpoint.read_meta(path)
    model_state, state = checkpoint.load_rank(path, ctx.rank)
    if state.get("rank") != ctx.rank or state.get("world_size") != ctx.world_size:
        raise CheckpointError(
            f"--resume {path}: rank{ctx.rank}.pt belongs to rank {state.get('rank')} "
            f"of {state.get('world_size')}, not rank {ctx.rank} of {ctx.world_size}"
        )
    run.start = int(meta["step"])
    if state["data"] != _data_position(run, run.start):
        raise CheckpointError(
            f"--resume {path}: the data position {state['data']} does not match this job's "
            f"{_data_position(run, run.start)}: the data, batch size or world size changed"
        )
    if run.sharded:  # every rank read the full state dicts; each keeps its shards
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(run.model, model_state, options=options)
        if isinstance(run.optimizer, distcomp.optim.CompressedOptimizer):
            run.optimizer.load_state_dict(state["optimizer"])
        else:
            set_optimizer_state_dict(run.model, run.optimizer, state["optimizer"], options=options)
    else:
        run.model.load_state_dict(model_state)
        run.optimizer.load_state_dict(state["optimizer"])
    if run.state is not None:
        run.state.load_state_dict(state["compression"])
    checkpoint.set_rng_state(state["rng"], ctx.device)
    run.records = [StepRecord(**r) for r in state["records"]]
    run.val_losses = [(int(s), float(v)) for s, v in state["val_losses"]]
    if ctx.rank == 0:
        logger.info("resumed from %s at step %d", path, run.start)


def _maybe_fault(rank: int, step: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec == f"{rank}:{step}":
        raise RuntimeError(f"injected fault ({FAULT_ENV}={spec}) on rank {rank} at step {step}")
    if spec == f"{rank}:{step}:hang":
        logger.warning("injected hang (%s=%s): rank %d stops answering", FAULT_ENV, spec, rank)
        while True:
            time.sleep(60)
