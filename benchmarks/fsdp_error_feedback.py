"""Held-out loss and memory of FSDP2 error-feedback modes, against plain FSDP2 trained on the same data.

    python benchmarks/fsdp_error_feedback.py            # 2 ranks on gloo over loopback
    python benchmarks/fsdp_error_feedback.py --no-save  # print only; by default each run is saved as
                                                        # benchmarks/results/<date>-fsdp-error-feedback.json and .md

Each method trains its own copy of the byte-level GPT (``fully_shard`` per
block and at the root) from the same initial weights on the same batches for
``--steps`` steps, then measures the loss on held-out text (the last tenth of
the corpus, never trained on), averaged over both ranks. Methods: plain FSDP2
(no custom reduce-scatter), then each compressor with each error-feedback mode
of ``distcomp.fsdp.register``: ``fp32`` (exact residuals, 4 bytes per gradient
element), ``bf16`` (2), ``int8`` (int8 blocks with an fp32 scale, 1.03, rounded
stochastically), ``int8-rn`` (the same rounded to nearest: an experiment, not an
option of ``register``) and ``none`` (no residual). ``EF MB`` is ``state.stats()["ef_bytes"]`` per rank;
``EF B/elem`` divides it by the model's parameter count (a rank's residuals
cover every unit's unsharded gradient, padded shards included).

With ``--seeds N`` every method is trained N times (seed s: initial weights and
batches); ``delta`` is the mean over seeds of the held-out loss minus plain
FSDP2's of the same seed, and ``spread`` the range of that paired difference:
what one seed more or less moves a figure by.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import distcomp
import distcomp.fsdp
from distcomp.models.gpt import GPT, GPTConfig
from distcomp.testing import run_ranks

try:
    from benchmarks import common
except ImportError:  # run as a script: the script's own folder is on sys.path
    import common

logger = logging.getLogger("distcomp.bench")

EF_MODES = ("fp32", "bf16", "int8", "int8-rn", "none")
"""Error-feedback modes measured; ``int8-rn`` is ``int8`` with its residuals rounded to nearest."""
COMPRESSORS: dict[str, dict[str, Any]] = {"sign": {}, "int8": {}, "topk": {"ratio": 0.01}}
"""Compressors ``--compressors`` may name, with their options."""
DEFAULT_COMPRESSORS = ("sign", "int8")


@dataclass(frozen=True, kw_only=True)
class Method:
    """One method: plain FSDP2 when ``compressor`` is None."""

    compressor: str | None = None
    error_feedback: str = "fp32"
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        if self.compressor is None:
            return "plain"
        return " ".join([self.compressor, *(f"{k}={v}" for k, v in self.options)])


def methods(compressors: Sequence[str]) -> list[Method]:
    """Plain FSDP2 first (the baseline), then every compressor with every error-feedback mode."""
    out = [Method()]
    for c in compressors:
        opts = tuple(COMPRESSORS.get(c, {}).items())
        out += [Method(compressor=c, error_feedback=ef, options=opts) for ef in EF_MODES]
    return out


@dataclass(frozen=True, kw_only=True)
class Bench:
    """Settings every method of a run shares."""

    steps: int = 160
    batch: int = 8
    """Sequences per rank per step."""
    d_model: int = 96
    n_layer: int = 2
    context: int = 64
    lr: float = 2e-3
    seeds: int = 3
    val_batches: int = 8
    """Held-out batches of ``batch`` sequences per rank, the same for every method."""

    def gpt(self) -> GPTConfig:
        heads = next(h for h in (6, 4, 2, 1) if self.d_model % h == 0)
        return GPTConfig(d_model=self.d_model, n_layer=self.n_layer, context=self.context, n_head=heads)


@dataclass(frozen=True, kw_only=True)
class Result:
    """One method's figures (means over seeds); None where a figure does not apply."""

    method: str
    error_feedback: str
    failure: str = ""
    val_loss: float | None = None
    delta: float | None = None
    """Held-out loss minus plain FSDP2's, same seed; mean over seeds."""
    spread: float | None = None
    """Largest minus smallest per-seed ``delta`` (0 with one seed)."""
    train_loss: float | None = None
    """Mean over the last 10 steps and both ranks of the training loss."""
    ef_mb: float | None = None
    ef_bytes_per_element: float | None = None
    seconds: float | None = None
    """Wall time of the method's training, slower rank, mean over seeds."""
    val_losses: tuple[float, ...] = ()


# -- inside a rank -----------------------------------------------------------------


def _split(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training text and held-out text (the last tenth)."""
    cut = data.numel() * 9 // 10
    return data[:cut], data[cut:]


def _train(method: Method, bench: Bench, seed: int, rank: int, data: torch.Tensor) -> dict[str, Any]:
    """Train one method from seed ``seed``; its held-out loss (mean over ranks) and figures."""
    torch.manual_seed(seed)
    model = GPT(bench.gpt())
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    state = None
    if method.compressor is not None:
        mode = method.error_feedback.removesuffix("-rn")
        state = distcomp.fsdp.register(model, method.compressor, error_feedback=mode, **dict(method.options))
        if method.error_feedback.endswith("-rn"):
            state.residual_generator = None
    opt = torch.optim.AdamW(model.parameters(), lr=bench.lr)
    train, val = _split(data)
    losses = []
    start = time.perf_counter()
    for step in range(bench.steps):
        x, y = common.batch(train, rank, 100_000 * seed + step, bench.batch, bench.context)
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        assert loss is not None
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    val_loss = _held_out(model, bench, rank, val)
    ef = int(state.stats()["ef_bytes"]) if state is not None else 0
    if state is not None:
        state.close()
    numel = sum(p.numel() for p in model.parameters())
    return {"val": val_loss, "train": statistics.fmean(losses[-10:]), "ef_bytes": ef, "numel": numel, "s": seconds}


@torch.no_grad()
def _held_out(model: GPT, bench: Bench, rank: int, val: torch.Tensor) -> float:
    """Mean loss over ``val_batches`` fixed held-out batches per rank, averaged over ranks."""
    total = torch.zeros(1)
    for i in range(bench.val_batches):
        x, y = common.batch(val, rank, 10_000_000 + i, bench.batch, bench.context)
        _, loss = model(x, y)
        assert loss is not None
        total += loss.detach()
    dist.all_reduce(total)
    return float(total) / (bench.val_batches * dist.get_world_size())


def run_rank(rank: int, world_size: int, bench: Bench, todo: Sequence[Method]) -> list[list[dict[str, Any]]]:
    """One rank's side: every method for every seed; ``[method][seed]`` records."""
    if rank == 0:
        common.log_to_console("[rank 0] ")
    else:
        logger.setLevel(logging.WARNING)
    torch.set_num_threads(1)
    data = common.corpus()
    out: list[list[dict[str, Any]]] = [[] for _ in todo]
    for seed in range(bench.seeds):
        for i, method in enumerate(todo):
            rec = _train(method, bench, seed, rank, data)
            out[i].append(rec)
            logger.info("seed %d %s ef=%s: held-out loss %.4f", seed, method.name, method.error_feedback, rec["val"])
    return out


# -- the experiment ------------------------------------------------------------------


def run(bench: Bench, todo: Sequence[Method], timeout: float) -> tuple[list[Result], dict[str, Any]]:
    """One job of 2 ranks; ``(results, facts)``."""
    load_before = os.getloadavg()[0]
    outputs = run_ranks(run_rank, 2, args=(bench, tuple(todo)), timeout=timeout, collective_timeout=600)
    plain = [rec["val"] for rec in outputs[0][0]]
    results = []
    for i, m in enumerate(todo):
        recs = outputs[0][i]
        vals = [rec["val"] for rec in recs]
        if not all(torch.isfinite(torch.tensor(v)) for v in vals):
            results.append(Result(method=m.name, error_feedback=m.error_feedback, failure="non-finite loss"))
            continue
        deltas = [v - p for v, p in zip(vals, plain, strict=True)]
        ef = max(outputs[r][i][0]["ef_bytes"] for r in range(2))
        compressed = m.compressor is not None
        results.append(
            Result(
                method=m.name,
                error_feedback=m.error_feedback if compressed else "-",
                val_loss=statistics.fmean(vals),
                delta=statistics.fmean(deltas) if compressed else None,
                spread=max(deltas) - min(deltas) if compressed else None,
                train_loss=statistics.fmean(
                    statistics.fmean(outputs[r][i][s]["train"] for r in range(2)) for s in range(len(recs))
                ),
                ef_mb=ef / 1e6 if compressed else None,
                ef_bytes_per_element=ef / recs[0]["numel"] if compressed else None,
                seconds=statistics.fmean(max(outputs[r][i][s]["s"] for r in range(2)) for s in range(len(recs))),
                val_losses=tuple(vals),
            )
        )
    facts = {"numel": outputs[0][0][0]["numel"], "load_average": [load_before, os.getloadavg()[0]]}
    return results, facts


# -- output ------------------------------------------------------------------------


FIGURES = (
    ("held-out loss", "val_loss", ".4f"),
    ("delta vs plain", "delta", "+.4f"),
    ("spread", "spread", ".4f"),
    ("train loss", "train_loss", ".4f"),
    ("EF MB/rank", "ef_mb", ".3f"),
    ("EF B/elem", "ef_bytes_per_element", ".2f"),
    ("s/run", "seconds", ".0f"),
)
"""The table's figures: column, :class:`Result` field, format."""


def describe(bench: Bench, facts: dict[str, Any]) -> str:
    """One line: model size, steps, seeds and how busy the machine was."""
    return (
        f"FSDP2, 2 ranks on gloo over loopback; GPT of {facts['numel'] / 1e6:.3f}M parameters "
        f"(d_model {bench.d_model}, {bench.n_layer} blocks, context {bench.context}), {bench.steps} AdamW steps "
        f"(lr {bench.lr}) of {bench.batch} sequences per rank; held-out loss over {bench.val_batches} batches per "
        f"rank; mean of {bench.seeds} seed(s); load average before/after "
        f"{facts['load_average'][0]:.1f}/{facts['load_average'][1]:.1f}"
    )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = common.make_parser(__doc__)
    d = Bench()
    p.add_argument("--steps", type=int, default=d.steps, help="training steps per method")
    p.add_argument("--seeds", type=int, default=d.seeds, help="runs per method (initial weights and batches)")
    p.add_argument("--batch", type=int, default=d.batch, help="sequences per rank per step")
    p.add_argument("--d-model", type=int, default=d.d_model, help="width of the GPT")
    p.add_argument("--layers", type=int, default=d.n_layer, help="transformer blocks (one FSDP module each)")
    p.add_argument("--context", type=int, default=d.context, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    p.add_argument(
        "--compressors",
        default=",".join(DEFAULT_COMPRESSORS),
        help=f"comma-separated compressors of {', '.join(COMPRESSORS)}, each with every error-feedback mode "
        "(topk uses ratio=0.01)",
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before the job is abandoned")
    common.add_output_args(p)
    return common.parse_args(p, argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    common.log_to_console()
    if args.steps < 3 or args.seeds < 1:
        raise SystemExit("fsdp_error_feedback.py: --steps must be >= 3 (compression starts at step 2), --seeds >= 1")
    bench = Bench(
        steps=args.steps,
        seeds=args.seeds,
        batch=args.batch,
        d_model=args.d_model,
        n_layer=args.layers,
        context=args.context,
        lr=args.lr,
    )
    todo = methods([c for c in args.compressors.split(",") if c])
    revision = common.git_revision()
    results, facts = run(bench, todo, args.timeout)
    table = common.results_table(results, ("method", "EF"), lambda r: (r.method, r.error_feedback), FIGURES)
    report = f"{describe(bench, facts)}\n\n{table}"
    print(f"\n{report}")
    common.write_results(
        args,
        "fsdp-error-feedback",
        title="FSDP2 error-feedback modes: held-out loss and memory",
        command=common.command_line(__file__, argv),
        report=report,
        figures={"git": revision, "bench": asdict(bench), **facts, "results": [asdict(r) for r in results]},
    )
    return 1 if any(r.failure for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
