"""distcomp's compressed optimizers against AdamW + DDP: step time, bytes per step, and convergence.

    python benchmarks/optimizers.py speed                  # 10.8M-parameter GPT, 2 ranks on gloo (loopback)
    python benchmarks/optimizers.py speed --steps 20 --json speed.json
    python benchmarks/optimizers.py speed --bandwidth none,100mbit,10mbit   # shaped links (root), a column each
    python benchmarks/optimizers.py convergence --steps 300 # the language model of `distcomp train`
    python benchmarks/optimizers.py convergence --state-dtypes fp32,bf16,int8,int4   # low-bit optimizer state
    python benchmarks/optimizers.py fsdp --steps 80         # the same optimizers on FSDP2, against AdamW + FSDP
    python benchmarks/optimizers.py speed --no-save        # print only; by default each run is saved as
                                                           # benchmarks/results/<date>-optimizers-<mode>.json and .md

``speed``: every method trains its own copy of the byte-level GPT from the same
weights on the same batches, in the same two rank processes, interleaved round
by round (drift in the machine's speed hits every method alike): AdamW + DDP,
AdamW + torch's ``noop_hook`` (sends nothing: the no-communication bound), and
each compressed optimizer in its compressed phase, with DDP and
``distcomp.optim.register`` (1-bit Adam also without DDP). Reported: the whole
step (forward, backward, optimizer) and the optimizer's ``step()`` alone,
median over the timed steps of the slower rank, wall and CPU time, and the
bytes each rank sends per step (the optimizers' own telemetry; DDP's fp32
all-reduce for AdamW). Correctness first: replicas must hold identical
parameters and finite losses (0/1 Adam: at its synchronisation steps), or the
method is reported as failed, without a speed. ``--bandwidth`` runs the two
ranks in network namespaces joined by a ``tc``-shaped link instead, one series
per listed link and a table of the ratios to the bound across them; below 50
Mbit/s AdamW + DDP (tens of seconds a step) is left out unless ``--dense``.

``convergence``: the model, data, learning-rate schedule and gradient clipping
of ``distcomp train``'s defaults, 2 ranks, AdamW + DDP against each compressed
optimizer + DDP + register at the same step count; final held-out loss, and
the optimizer state kept between steps, in bytes per parameter (momentum +
variance, and in all: with the error-feedback buffers and 0/1 Adam's extra
state). ``--state-dtypes`` adds a row per compressed optimizer and
``state_dtype``; ``--methods`` keeps some of the optimizers only.

``fsdp``: the same model, data, schedule and clipping, with each GPT block and
the model wrapped by ``fully_shard`` (FSDP2), 2 ranks: AdamW + FSDP against
1-bit Adam and 1-bit LAMB registered on the FSDP model (1-bit Adam also with
int8 and int4 state, and with int8 worker errors). One run gives both
speed and convergence: the methods train round by round, interleaved as in
``speed``, and the step time is the median over the compressed phase (after its
first two steps, which allocate). Also reported: bytes sent per step by the
gradient reduce-scatters (the parameter all-gathers are the same for every
method and are not counted), the optimizer state each rank holds per model
parameter, and the held-out loss at the same step. Gradient clipping is kept as
in ``convergence`` but acts only on AdamW and the warm-up: in the compressed
phase the momentum is exchanged during backward, before any clipping.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import distcomp.optim as optim
from distcomp.bench import netns
from distcomp.models.gpt import GPT, GPTConfig
from distcomp.testing import run_ranks

try:
    from benchmarks import common
except ImportError:  # run as a script: the script's own folder is on sys.path
    import common

logger = logging.getLogger("distcomp.bench")

WORLD_SIZE = 2
Method = Literal[
    "adamw",
    "noop",
    "onebit_adam",
    "onebit_adam_alone",
    "zero_one_adam",
    "onebit_lamb",
    "adamw_fsdp",
    "onebit_adam_fsdp",
    "onebit_lamb_fsdp",
]
LABELS = {
    "adamw": "AdamW + DDP",
    "noop": "AdamW + noop_hook (bound)",
    "onebit_adam": "OneBitAdam + DDP",
    "onebit_adam_alone": "OneBitAdam, no DDP",
    "zero_one_adam": "ZeroOneAdam + DDP",
    "onebit_lamb": "OneBitLamb + DDP",
    "adamw_fsdp": "AdamW + FSDP",
    "onebit_adam_fsdp": "OneBitAdam on FSDP",
    "onebit_lamb_fsdp": "OneBitLamb on FSDP",
}


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """One method: an optimizer and how gradients reach it."""

    method: Method
    """Which optimizer and wrapper (see ``LABELS``)."""
    lr: float = 3e-4
    """Learning rate (LAMB's is per unit of weight norm, so it needs a larger one)."""
    options: tuple[tuple[str, Any], ...] = ()
    """Options of a distcomp optimizer as ``(key, value)`` pairs."""
    state_dtype: str = "fp32"
    """How a distcomp optimizer keeps its momentum and variance (``fp32``, ``bf16``, ``int8``, ``int4``)."""

    @property
    def label(self) -> str:
        return LABELS[self.method] + (f", {self.state_dtype} state" if self.state_dtype != "fp32" else "")


@dataclass(frozen=True, kw_only=True)
class FsdpConfig(ExperimentConfig):
    """One method on a ``fully_shard`` model (each GPT block, then the model)."""

    error_feedback: str = "fp32"
    """How a compressed optimizer's reduce-scatters keep their worker errors (``fp32``, ``bf16``, ``int8``)."""

    @property
    def label(self) -> str:
        worker = f", {self.error_feedback} worker errors" if self.error_feedback != "fp32" else ""
        return super().label + worker


@dataclass(frozen=True, kw_only=True)
class ExperimentResult:
    """One method's figures; None when its correctness check failed."""

    config: ExperimentConfig
    failure: str = ""
    step_ms: float | None = None
    """Whole step, wall time (median over steps of the slower rank)."""
    x_bound: float | None = None
    """``step_ms`` over the no-communication bound's."""
    x_adamw: float | None = None
    """``step_ms`` over AdamW + DDP's."""
    cpu_ms: float | None = None
    """Whole step, CPU time of the busier rank (less sensitive to other work on the machine)."""
    opt_ms: float | None = None
    """``optimizer.step()`` alone, wall time."""
    sent_mb: float | None = None
    """MB each rank sends per step (mean over the timed steps)."""
    ratio: float | None = None
    """fp32 all-reduce bytes over bytes sent."""
    final_loss: float | None = None
    """Mean over ranks of the last timed step's loss (or the held-out loss in ``convergence``)."""


def get_configs(
    kind: Literal["speed", "convergence"],
    warmup: int,
    state_dtypes: Sequence[str] = ("fp32",),
    methods: Sequence[str] | None = None,
) -> list[ExperimentConfig]:
    """The methods of a run; compressed optimizers enter their compressed phase after ``warmup`` steps.

    Each compressed optimizer comes once per entry of ``state_dtypes``; ``methods``
    (default: all) keeps only the compressed optimizers it names (AdamW stays: it is the baseline).
    """
    return [
        dataclasses.replace(c, state_dtype=dtype)
        for c in _methods(kind, warmup)
        if c.method in ("adamw", "noop") or methods is None or c.method in methods
        for dtype in (("fp32",) if c.method in ("adamw", "noop") else state_dtypes)
    ]


def _methods(kind: Literal["speed", "convergence"], warmup: int) -> list[ExperimentConfig]:
    zo = (("var_freeze_step", warmup), ("var_update_scaler", 16), ("local_step_scaler", 1), ("local_step_clipper", 4))
    if kind == "convergence":
        # kappa 32: the first 32 steps exact, 1-bit gradients at 14 of the remaining variance-phase steps (with
        # kappa 8 or 16 the 1-bit gradient steps start so early in this short run that it ends 4-8% behind AdamW).
        zo = (
            ("var_freeze_step", warmup),
            ("var_update_scaler", 32),
            ("local_step_scaler", 60),
            ("local_step_clipper", 4),
        )
    out = [ExperimentConfig(method="adamw", lr=2e-3 if kind == "convergence" else 3e-4)]
    if kind == "speed":
        out.append(ExperimentConfig(method="noop"))
    lr = 2e-3 if kind == "convergence" else 3e-4
    out += [
        ExperimentConfig(method="onebit_adam", lr=lr, options=(("freeze_step", warmup),)),
        ExperimentConfig(method="zero_one_adam", lr=lr, options=zo),
        ExperimentConfig(
            method="onebit_lamb",
            lr=2e-2 if kind == "convergence" else 3e-3,
            options=(("freeze_step", warmup), ("coeff_beta", 0.9)),
        ),
    ]
    if kind == "speed":
        out.insert(3, ExperimentConfig(method="onebit_adam_alone", options=(("freeze_step", warmup),)))
    return out


def _optimizer(config: ExperimentConfig, groups: Any, betas: tuple[float, float]) -> torch.optim.Optimizer:
    options = {"betas": betas, **dict(config.options)}
    if config.method in ("adamw", "noop", "adamw_fsdp"):
        return torch.optim.AdamW(groups, lr=config.lr, betas=betas, weight_decay=0.0)
    cls = {
        "onebit_adam": optim.OneBitAdam,
        "onebit_adam_alone": optim.OneBitAdam,
        "zero_one_adam": optim.ZeroOneAdam,
        "onebit_lamb": optim.OneBitLamb,
        "onebit_adam_fsdp": optim.OneBitAdam,
        "onebit_lamb_fsdp": optim.OneBitLamb,
    }[config.method]
    return cls(groups, lr=config.lr, state_dtype=config.state_dtype, **options)


def state_bytes(opt: torch.optim.Optimizer) -> dict[str, float]:
    """Optimizer-state bytes per parameter: a distcomp optimizer's :meth:`state_bytes`, or AdamW's tensors.

    On FSDP, the bytes this rank holds (its shards) per parameter of the whole model.
    """
    if isinstance(opt, optim.CompressedOptimizer):
        return opt.state_bytes()
    params = sum(p.numel() for g in opt.param_groups for p in g["params"])  # a DTensor's numel is the whole's
    held = {
        key: sum(_local(st[key]).numel() * st[key].element_size() for st in opt.state.values() if key in st) / params
        for key in ("exp_avg", "exp_avg_sq")
    }
    return {
        "momentum": held["exp_avg"],
        "variance": held["exp_avg_sq"],
        "errors": 0.0,
        "other": 0.0,
        "total": sum(held.values()),
    }


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor; the tensor itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass
class _Replica:
    config: ExperimentConfig
    model: GPT
    wrapped: torch.nn.Module
    opt: torch.optim.Optimizer

    @classmethod
    def build(cls, config: ExperimentConfig, gpt: GPTConfig, seed: int, betas: tuple[float, float]) -> _Replica:
        torch.manual_seed(seed)
        model = GPT(gpt)
        if isinstance(config, FsdpConfig):
            return cls._build_fsdp(config, model, betas)
        # Every replica starts from the same seed: no 43.6 MB broadcast per replica (35 s at 10 Mbit/s).
        wrapped: torch.nn.Module = model if config.method == "onebit_adam_alone" else DDP(model, init_sync=False)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        opt = _optimizer(config, [{"params": decay}, {"params": rest}], betas)
        if config.method == "noop":
            wrapped.register_comm_hook(None, noop_hook)
        elif isinstance(opt, optim.CompressedOptimizer) and isinstance(wrapped, DDP):
            optim.register(wrapped, opt)
        return cls(config, model, wrapped, opt)

    @classmethod
    def _build_fsdp(cls, config: FsdpConfig, model: GPT, betas: tuple[float, float]) -> _Replica:
        """As ``distcomp train --parallel fsdp``: each block and the model are FSDP units over all ranks."""
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        # The optimizer is built on the sharded parameters, so its state is sharded too.
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        opt = _optimizer(config, [{"params": decay}, {"params": rest}], betas)
        if isinstance(opt, optim.CompressedOptimizer):
            optim.register(model, opt, error_feedback=config.error_feedback)
        return cls(config, model, model, opt)

    def step(
        self, x: torch.Tensor, y: torch.Tensor, lr: float | None = None, clip: float = 0.0
    ) -> tuple[float, float, float, float]:
        """``(wall s, CPU s, optimizer.step() wall s, loss)`` of one training step."""
        if lr is not None:
            for group in self.opt.param_groups:
                group["lr"] = lr
        start, cpu = time.perf_counter(), time.process_time()
        _, loss = self.wrapped(x, y)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        tick = time.perf_counter()
        self.opt.step()
        opt_s = time.perf_counter() - tick
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start, time.process_time() - cpu, opt_s, loss.item()

    def sent_bytes(self) -> float:
        if isinstance(self.opt, optim.CompressedOptimizer):
            return float((self.opt.stats()["step"] or {}).get("sent_bytes", 0.0))
        if self.config.method == "noop":
            return 0.0
        if self.config.method == "adamw_fsdp":  # FSDP's fp32 reduce-scatter: half an all-reduce
            return (WORLD_SIZE - 1) / WORLD_SIZE * 4 * sum(p.numel() for p in self.model.parameters())
        return 2 * (WORLD_SIZE - 1) / WORLD_SIZE * 4 * sum(p.numel() for p in self.model.parameters())

    def synced(self) -> bool:
        """Whether the replicas must agree now (0/1 Adam's agree only after a synchronisation step)."""
        return not isinstance(self.opt, optim.ZeroOneAdam) or self.opt.phase(self.opt.steps - 1) != "local"

    def digest(self) -> str:
        return common.param_digest(self.model)


# -- speed ---------------------------------------------------------------------------


def _rank_logging(rank: int) -> None:
    """One thread per rank (2 ranks share the cores); progress lines from rank 0 only."""
    torch.set_num_threads(1)
    if rank == 0:
        common.log_to_console("[rank 0] ")


def speed_rank(
    rank: int, world_size: int, configs: Sequence[ExperimentConfig], warmup: int, steps: int
) -> dict[str, Any]:
    """One rank of the speed run (module-level so that spawned processes can import it)."""
    _rank_logging(rank)
    gpt, data = GPTConfig(), common.corpus()
    reps = [_Replica.build(c, gpt, 0, (0.9, 0.999)) for c in configs]
    rec: dict[str, dict[str, list]] = {
        c.label: {"wall": [], "cpu": [], "opt": [], "loss": [], "sent": [], "ok": []} for c in configs
    }
    for step in range(warmup + steps):
        x, y = common.batch(data, rank, step, 8, gpt.context)
        for j in range(len(reps)):
            rep = reps[(step + j) % len(reps)]
            dist.barrier()  # every method starts its step with the ranks in step
            wall, cpu, opt_s, loss = rep.step(x, y)
            r = rec[rep.config.label]
            if step >= warmup:
                for key, value in (("wall", wall), ("cpu", cpu), ("opt", opt_s), ("sent", rep.sent_bytes())):
                    r[key].append(value)
            r["loss"].append(loss)
            if rep.synced():
                r["ok"].append(rep.digest())
        if rank == 0:
            logger.info("round %d/%d done", step + 1, warmup + steps)
    return {"records": rec, "numel": sum(p.numel() for p in reps[0].model.parameters())}


def run_experiment(
    configs: Sequence[ExperimentConfig], warmup: int, steps: int, timeout: float = 3600, bandwidth: str | None = None
) -> tuple[list[ExperimentResult], dict[str, Any]]:
    """The speed run: every method in one 2-rank job, over loopback or a link shaped to ``bandwidth``;
    ``(results, facts)``."""
    job = (tuple(configs), warmup, steps)
    if bandwidth is None:
        outs = run_ranks(speed_rank, WORLD_SIZE, args=job, timeout=timeout, collective_timeout=600)
    else:
        outs = netns.run_ranks(__file__, speed_rank, bandwidth, job, timeout=timeout)
    recs = {c.label: [o["records"][c.label] for o in outs] for c in configs}
    failures = {}
    for c in configs:
        ranks = recs[c.label]
        if not all(math.isfinite(v) for r in ranks for v in r["loss"]):
            failures[c.label] = "non-finite loss"
        elif c.method != "noop" and ranks[0]["ok"] != ranks[1]["ok"]:
            failures[c.label] = "ranks hold different parameters"

    def med(label: str, key: str) -> float:
        return common.median_step(r[key] for r in recs[label])

    wall = {c.label: med(c.label, "wall") for c in configs if c.label not in failures}
    dense = 2 * (WORLD_SIZE - 1) / WORLD_SIZE * 4 * outs[0]["numel"]
    results = []
    for c in configs:
        if c.label in failures:
            results.append(ExperimentResult(config=c, failure=failures[c.label]))
            continue
        sent = statistics.fmean(recs[c.label][0]["sent"])
        results.append(
            ExperimentResult(
                config=c,
                step_ms=wall[c.label] * 1e3,
                x_bound=common.ratio(wall, c.label, LABELS["noop"]),
                x_adamw=common.ratio(wall, c.label, LABELS["adamw"]),
                cpu_ms=med(c.label, "cpu") * 1e3,
                opt_ms=med(c.label, "opt") * 1e3,
                sent_mb=sent / 1e6,
                ratio=dense / sent if sent else None,
                final_loss=statistics.fmean(r["loss"][-1] for r in recs[c.label]),
            )
        )
    return results, {"numel": outs[0]["numel"], "warmup": warmup, "steps": steps, "bandwidth": bandwidth}


# -- convergence ------------------------------------------------------------------------


def convergence_rank(rank: int, world_size: int, configs: Sequence[ExperimentConfig], steps: int) -> dict[str, Any]:
    """Train each method with `distcomp train`'s default model, data, schedule and clipping."""
    from distcomp.train.config import TrainConfig
    from distcomp.train.data import ShardedBatches, load_corpus, val_batches
    from distcomp.train.optim import lr_at

    _rank_logging(rank)
    cfg = TrainConfig(steps=steps)
    corpus = load_corpus(cfg.data, cfg.model.context)
    out = {}
    for c in configs:
        rep = _Replica.build(c, cfg.model, cfg.seed, cfg.optimizer.betas)
        batches = ShardedBatches(corpus.train, cfg.model.context, cfg.data.batch_size, rank, world_size, cfg.seed)
        losses, start = [], time.perf_counter()
        for step in range(steps):
            x, y = batches.batch(step, torch.device("cpu"))
            lr = lr_at(cfg.optimizer, step, steps) * c.lr / cfg.optimizer.lr
            losses.append(rep.step(x, y, lr=lr, clip=cfg.optimizer.grad_clip)[3])
            if rank == 0 and (step + 1) % 50 == 0:
                logger.info("%s: step %d, loss %.4f", c.label, step + 1, losses[-1])
        val = _val_loss(
            rep.model,
            val_batches(corpus.val, cfg.model.context, cfg.data.batch_size, cfg.eval.batches, rank, world_size),
        )
        stats = rep.opt.stats()["total"] if isinstance(rep.opt, optim.CompressedOptimizer) else {}
        out[c.label] = {
            "losses": losses,
            "val": val,
            "seconds": time.perf_counter() - start,
            "sent_bytes": stats.get("sent_bytes"),
            "dense_bytes": stats.get("dense_bytes"),
            "state": state_bytes(rep.opt),
        }
        if rank == 0:
            logger.info("%s: val loss %.4f after %d steps", c.label, val, steps)
    return out


@torch.no_grad()
def _val_loss(model: GPT, batches: list[torch.Tensor]) -> float:
    total = torch.zeros(2, dtype=torch.float64)
    for seqs in batches:
        seqs = seqs.long()
        _, loss = model(seqs[:, :-1], seqs[:, 1:])
        total += torch.tensor([loss.item() * seqs[:, 1:].numel(), seqs[:, 1:].numel()], dtype=torch.float64)
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


# -- FSDP --------------------------------------------------------------------------------


def fsdp_configs(warmup: int) -> list[FsdpConfig]:
    """AdamW + FSDP, then the compressed optimizers on FSDP (1-bit Adam with each low-bit state and int8 errors).

    Learning rates, options and ``warmup`` (the step compression starts at) as in ``convergence``.
    """
    adam = (("freeze_step", warmup),)
    return [
        FsdpConfig(method="adamw_fsdp", lr=2e-3),
        FsdpConfig(method="onebit_adam_fsdp", lr=2e-3, options=adam),
        FsdpConfig(method="onebit_lamb_fsdp", lr=2e-2, options=(("freeze_step", warmup), ("coeff_beta", 0.9))),
        FsdpConfig(method="onebit_adam_fsdp", lr=2e-3, options=adam, state_dtype="int8"),
        FsdpConfig(method="onebit_adam_fsdp", lr=2e-3, options=adam, state_dtype="int4"),
        FsdpConfig(method="onebit_adam_fsdp", lr=2e-3, options=adam, error_feedback="int8"),
    ]


@dataclass(frozen=True, kw_only=True)
class FsdpResult:
    """One method's figures on FSDP; None where its training failed."""

    config: FsdpConfig
    failure: str = ""
    step_ms: float | None = None
    """Whole step, wall time (median over the compressed phase of the slower rank)."""
    x_adamw: float | None = None
    """``step_ms`` over AdamW + FSDP's."""
    cpu_ms: float | None = None
    """Whole step, CPU time of the busier rank."""
    opt_ms: float | None = None
    """``optimizer.step()`` alone, wall time."""
    sent_mb: float | None = None
    """MB each rank's gradient reduce-scatters send per step (compressed phase)."""
    ratio: float | None = None
    """fp32 reduce-scatter bytes over bytes sent."""
    momentum: float | None = None
    """Optimizer-state bytes this rank holds per model parameter: momentum, ..."""
    variance: float | None = None
    errors: float | None = None
    """... error feedback (worker, server) and the 1-bit copy of the momentum, ..."""
    state: float | None = None
    """... and in all."""
    train_loss: float | None = None
    """Mean over ranks of the last 10 steps' training loss."""
    val_loss: float | None = None
    """Held-out loss after the last step."""
    vs_adamw: float | None = None
    """``val_loss`` relative to AdamW + FSDP's (``+0.01``: 1% higher)."""


def fsdp_rank(rank: int, world_size: int, configs: Sequence[FsdpConfig], steps: int, timed_from: int) -> dict[str, Any]:
    """Train every method on FSDP, interleaved round by round, with `distcomp train`'s model, data and schedule."""
    from distcomp.train.config import TrainConfig
    from distcomp.train.data import ShardedBatches, load_corpus, val_batches
    from distcomp.train.optim import lr_at

    _rank_logging(rank)
    cfg = TrainConfig(steps=steps)
    corpus = load_corpus(cfg.data, cfg.model.context)
    batches = ShardedBatches(corpus.train, cfg.model.context, cfg.data.batch_size, rank, world_size, cfg.seed)
    reps = [_Replica.build(c, cfg.model, cfg.seed, cfg.optimizer.betas) for c in configs]
    rec: dict[str, dict[str, list]] = {
        c.label: {"wall": [], "cpu": [], "opt": [], "loss": [], "sent": []} for c in configs
    }
    for step in range(steps):
        x, y = batches.batch(step, torch.device("cpu"))
        for j in range(len(reps)):
            rep = reps[(step + j) % len(reps)]
            lr = lr_at(cfg.optimizer, step, steps) * rep.config.lr / cfg.optimizer.lr
            dist.barrier()  # every method starts its step with the ranks in step
            wall, cpu, opt_s, loss = rep.step(x, y, lr=lr, clip=cfg.optimizer.grad_clip)
            r = rec[rep.config.label]
            if step >= timed_from:
                for key, value in (("wall", wall), ("cpu", cpu), ("opt", opt_s), ("sent", rep.sent_bytes())):
                    r[key].append(value)
            r["loss"].append(loss)
        if rank == 0 and (step + 1) % 10 == 0:
            logger.info("round %d/%d done", step + 1, steps)
    val = val_batches(corpus.val, cfg.model.context, cfg.data.batch_size, cfg.eval.batches, rank, world_size)
    for rep in reps:
        r = rec[rep.config.label]
        r["val"] = _val_loss(rep.model, val)
        r["state"] = state_bytes(rep.opt)
        r["stats"] = rep.opt.stats()["total"] if isinstance(rep.opt, optim.CompressedOptimizer) else {}
    return {
        "records": rec,
        "numel": sum(p.numel() for p in reps[0].model.parameters()),
        "clip": cfg.optimizer.grad_clip,
        "batch": cfg.data.batch_size,
        "context": cfg.model.context,
    }


def run_fsdp(
    configs: Sequence[FsdpConfig], steps: int, warmup: int, timeout: float = 3600
) -> tuple[list[FsdpResult], dict[str, Any]]:
    """The FSDP run: every method in one 2-rank job; ``(results, facts)``."""
    timed_from = warmup + 2  # the first two compressed steps allocate the error buffers
    outs = run_ranks(
        fsdp_rank, WORLD_SIZE, args=(tuple(configs), steps, timed_from), timeout=timeout, collective_timeout=600
    )
    recs = {c.label: [o["records"][c.label] for o in outs] for c in configs}
    failures = {
        c.label: "non-finite loss"
        for c in configs
        if not all(math.isfinite(v) for r in recs[c.label] for v in (*r["loss"], r["val"]))
    }
    wall = {c.label: common.median_step(r["wall"] for r in recs[c.label]) for c in configs if c.label not in failures}
    base_val = recs[LABELS["adamw_fsdp"]][0]["val"] if LABELS["adamw_fsdp"] not in failures else None
    dense = (WORLD_SIZE - 1) / WORLD_SIZE * 4 * outs[0]["numel"]
    results = [_fsdp_result(c, recs[c.label], wall, dense, base_val, failures.get(c.label, "")) for c in configs]
    facts = {k: outs[0][k] for k in ("numel", "clip", "batch", "context")}
    return results, {**facts, "steps": steps, "warmup": warmup, "timed_from": timed_from}


def _fsdp_result(
    c: FsdpConfig,
    ranks: list[dict[str, Any]],
    wall: dict[str, float],
    dense: float,
    base_val: float | None,
    failure: str,
) -> FsdpResult:
    if failure:
        return FsdpResult(config=c, failure=failure)
    sent = statistics.fmean(ranks[0]["sent"])
    state = max((r["state"] for r in ranks), key=lambda s: s["total"])  # the rank holding more (uneven shards)
    val = ranks[0]["val"]
    return FsdpResult(
        config=c,
        step_ms=wall[c.label] * 1e3,
        x_adamw=common.ratio(wall, c.label, LABELS["adamw_fsdp"]),
        cpu_ms=common.median_step(r["cpu"] for r in ranks) * 1e3,
        opt_ms=common.median_step(r["opt"] for r in ranks) * 1e3,
        sent_mb=sent / 1e6,
        ratio=dense / sent if sent else None,
        momentum=state["momentum"],
        variance=state["variance"],
        errors=state["errors"],
        state=state["total"],
        train_loss=statistics.fmean(statistics.fmean(r["loss"][-10:]) for r in ranks),
        val_loss=val,
        vs_adamw=val / base_val - 1 if base_val else None,
    )


# -- output ------------------------------------------------------------------------------


SPEED_FIGURES = (
    ("ms/step", "step_ms", ".0f"),
    ("x bound", "x_bound", ".2f"),
    ("x AdamW+DDP", "x_adamw", ".2f"),
    ("cpu ms/step", "cpu_ms", ".0f"),
    ("optimizer.step() ms", "opt_ms", ".0f"),
    ("MB sent/step", "sent_mb", ".2f"),
    ("ratio", "ratio", ".1f"),
)
"""The speed table's figures: column, :class:`ExperimentResult` field, format."""


def format_speed(results: Sequence[ExperimentResult]) -> str:
    """A markdown table of the speed run, one row per method."""
    return common.results_table(results, ("method",), lambda r: (r.config.label,), SPEED_FIGURES)


FSDP_FIGURES = (
    ("ms/step", "step_ms", ".0f"),
    ("x AdamW+FSDP", "x_adamw", ".2f"),
    ("cpu ms/step", "cpu_ms", ".0f"),
    ("optimizer.step() ms", "opt_ms", ".0f"),
    ("MB sent/step", "sent_mb", ".3f"),
    ("ratio", "ratio", ".1f"),
    ("momentum B/param", "momentum", ".2f"),
    ("variance B/param", "variance", ".2f"),
    ("errors B/param", "errors", ".2f"),
    ("state B/param", "state", ".2f"),
    ("train loss (last 10)", "train_loss", ".4f"),
    ("held-out loss", "val_loss", ".4f"),
    ("vs AdamW", "vs_adamw", "+.2%"),
)
"""The FSDP table's figures: column, :class:`FsdpResult` field, format."""


def format_fsdp(results: Sequence[FsdpResult]) -> str:
    """A markdown table of the FSDP run, one row per method."""
    return common.results_table(results, ("method", "lr"), lambda r: (r.config.label, f"{r.config.lr:g}"), FSDP_FIGURES)


def format_convergence(configs: Sequence[ExperimentConfig], outs: list[dict[str, Any]], steps: int) -> str:
    base = outs[0][LABELS["adamw"]]["val"]
    target = {"onebit_adam": 0.02, "zero_one_adam": 0.03, "onebit_lamb": 0.03}
    columns = (
        "method",
        "lr",
        "options",
        "steps",
        "train loss (last 10)",
        "held-out loss",
        "vs AdamW",
        "vs fp32 state",
        "target",
        "ratio",
        "m+v B/param",
        "state B/param",
    )
    rows = []
    for c in configs:
        r = outs[0][c.label]
        tail = statistics.fmean(statistics.fmean(o[c.label]["losses"][-10:]) for o in outs)
        rel = r["val"] / base - 1
        fp32_state = outs[0].get(dataclasses.replace(c, state_dtype="fp32").label)
        vs_fp32 = "-" if c.state_dtype == "fp32" or fp32_state is None else f"{r['val'] / fp32_state['val'] - 1:+.2%}"
        verdict = (
            "-"
            if c.method not in target
            else f"<= {target[c.method]:.0%}: " + ("met" if rel <= target[c.method] else "NOT met")
        )
        ratio = r["dense_bytes"] / r["sent_bytes"] if r["sent_bytes"] else None
        opts = ", ".join(f"{k}={v}" for k, v in c.options) or "-"
        rows.append(
            [
                c.label,
                f"{c.lr:g}",
                opts,
                str(steps),
                f"{tail:.4f}",
                f"{r['val']:.4f}",
                f"{rel:+.2%}",
                vs_fp32,
                verdict,
                common.fmt(ratio, ".1f"),
                f"{r['state']['momentum'] + r['state']['variance']:.2f}",
                f"{r['state']['total']:.2f}",
            ]
        )
    return common.markdown_table(columns, rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``speed`` or ``convergence``, print its table and write the results files."""
    p = common.make_parser(__doc__)
    p.add_argument("mode", choices=["speed", "convergence", "fsdp"])
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps (speed, default 10) or training steps (convergence, default 300; fsdp, default 80)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="exact steps before compression (speed: untimed; default 5 for speed, 20%% of --steps for "
        "convergence and fsdp)",
    )
    p.add_argument(
        "--state-dtypes",
        default="fp32",
        help="convergence: comma-separated state_dtype values, one row per compressed optimizer each (default fp32)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="convergence: comma-separated compressed optimizers to run (default all; AdamW always runs)",
    )
    p.add_argument(
        "--bandwidth",
        default=None,
        help="speed: run the ranks in two network namespaces at this tc rate (e.g. 10mbit); several, "
        "comma-separated, give one series each and a table across them ('none' is loopback: none,100mbit,10mbit)",
    )
    p.add_argument(
        "--dense",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="speed: measure AdamW + DDP (dense fp32 all-reduce) on every link (default: not below 50 Mbit/s, "
        "where one of its steps takes tens of seconds)",
    )
    common.add_output_args(p)
    if netns.serve_worker(argv):
        return 0
    args = common.parse_args(p, argv)
    common.log_to_console()
    if args.mode == "speed":
        summary, table, figures = _speed(args)
    elif args.mode == "fsdp":
        steps = args.steps or 80
        warmup = args.warmup or steps // 5
        if not 0 < warmup < steps - 2:
            p.error(f"--warmup {warmup} with --steps {steps}: compression must start at least 3 steps before the end")
        results, facts = run_fsdp(fsdp_configs(warmup), steps, warmup)
        summary = _fsdp_summary(facts)
        table = format_fsdp(results)
        figures = {"facts": facts, "results": [asdict(r) for r in results]}
    else:
        steps = args.steps or 300
        configs = get_configs(
            "convergence",
            args.warmup or steps // 5,
            state_dtypes=args.state_dtypes.split(","),
            methods=args.methods.split(",") if args.methods else None,
        )
        outs = run_ranks(
            convergence_rank, WORLD_SIZE, args=(tuple(configs), steps), timeout=4 * 3600, collective_timeout=600
        )
        summary = (
            f"`distcomp train` defaults (3.3M-parameter GPT, batch 8 x 128 per rank, cosine schedule, "
            f"clip 1.0), {WORLD_SIZE} ranks, {steps} steps"
        )
        table = format_convergence(configs, outs, steps)
        figures = {"steps": steps, "configs": [asdict(c) for c in configs], "ranks": outs}
    print(f"\n{summary}\n")
    print(table)
    title = {
        "speed": "Compressed optimizers: step time",
        "convergence": "Compressed optimizers: convergence",
        "fsdp": "Compressed optimizers on FSDP: step time, bytes, state and convergence",
    }
    links = (
        [netns.link_name(b) for b in netns.parse_links(args.bandwidth)]
        if args.mode == "speed" and args.bandwidth
        else []
    )
    common.write_results(
        args,
        "-".join([f"optimizers-{args.mode}", *links]),
        title=title[args.mode],
        command=common.command_line(__file__, argv),
        report=f"{summary}\n\n{table}",
        figures=figures,
    )
    return 0


def _speed(args: argparse.Namespace) -> tuple[str, str, dict[str, Any]]:
    """The speed mode on every link of ``--bandwidth``: ``(summary, tables, figures)``."""
    steps, warmup = args.steps or 10, args.warmup or 5
    if warmup < 5:
        # Frozen after one or two exact steps, the variance is still zero where a gradient was: 1-bit Adam
        # then diverges (and a diverged model's step time is not the optimizer's).
        raise SystemExit(f"optimizers.py speed: --warmup {warmup}: needs >= 5 (3 exact steps, then 2 untimed)")
    links = netns.parse_links(args.bandwidth)
    for link in links:  # a bad rate fails here, before any rank starts
        if link is not None:
            try:
                netns.rate_bits(link)
            except ValueError as exc:
                raise SystemExit(f"optimizers.py: {exc}") from None
    configs = get_configs("speed", max(warmup - 2, 1))  # the first two compressed steps allocate: untimed
    reports, series = [], []
    for link in links:
        slow = link is not None and netns.rate_bits(link) < netns.SLOW_LINK_BITS
        keep = [c for c in configs if c.method != "adamw" or (not slow if args.dense is None else args.dense)]
        results, facts = run_experiment(keep, warmup, steps, bandwidth=link)
        table = format_speed(results)
        print(f"\n{netns.link_name(link)}\n\n{table}")
        reports.append(f"## {netns.link_name(link)}\n\n{table}" if len(links) > 1 else table)
        series.append({"facts": facts, "results": [asdict(r) for r in results]})
    summary = (
        f"{series[0]['facts']['numel'] / 1e6:.1f}M-parameter GPT, {WORLD_SIZE} ranks on gloo "
        f"({', '.join(_describe_link(b) for b in links)}), median of {steps} steps after {warmup}; compressed "
        "optimizers in their compressed phase, registered with overlap (the default)"
    )
    if len(links) > 1:
        reports.insert(0, format_speed_overview(series))
    return summary, "\n\n".join(reports), (series[0] if len(series) == 1 else {"series": series})


def _describe_link(bandwidth: str | None) -> str:
    return "loopback" if bandwidth is None else f"2 network namespaces, tbf {bandwidth}"


def format_speed_overview(series: Sequence[dict[str, Any]]) -> str:
    """Each method's step over the bound of its own series, one column per link, and its bytes."""
    links = [netns.link_name(s["facts"]["bandwidth"]) for s in series]
    table = common.across_links(("method",), links, [map(_overview_row, s["results"]) for s in series])
    return f"All links: median step over the no-communication bound of the same series (- : not measured)\n\n{table}"


def _overview_row(r: dict[str, Any]) -> tuple[tuple[str], str, str | None]:
    label = ExperimentConfig(**{**r["config"], "options": ()}).label
    cell = "failed" if r["failure"] else common.fmt(r["x_bound"], ".2f")
    return (label,), cell, None if r["sent_mb"] is None else f"{r['sent_mb']:.2f}"


def _fsdp_summary(facts: dict[str, Any]) -> str:
    return (
        f"`distcomp train` defaults ({facts['numel'] / 1e6:.1f}M-parameter GPT, batch {facts['batch']} x "
        f"{facts['context']} per rank, cosine schedule, clip {facts['clip']:g}) on FSDP2 (`fully_shard` on each block "
        f"and the model), {WORLD_SIZE} ranks on gloo (loopback), {facts['steps']} steps, compressed from step "
        f"{facts['warmup']}. Step times: median over steps {facts['timed_from']}-{facts['steps'] - 1} of the slower "
        "rank, the methods interleaved round by round. MB sent/step: the gradient reduce-scatters in the compressed "
        "phase (the parameter all-gathers are the same for every method and not counted). State: bytes this rank "
        "holds per model parameter (errors: worker and server errors and the 1-bit momentum copy). Clipping acts on "
        "AdamW and the warm-up only: in the compressed phase the momentum is exchanged during backward, before it."
    )


if __name__ == "__main__":
    sys.exit(main())
