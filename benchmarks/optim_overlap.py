"""1-bit Adam's compressed phase with the exchange overlapped with backward, against the exchange in step().

    python benchmarks/optim_overlap.py                                 # loopback
    sudo python benchmarks/optim_overlap.py --bandwidth 100mbit,10mbit  # two namespaces, shaped veth

Two gloo ranks train the benchmark GPT under DDP with ``distcomp.optim.OneBitAdam``
registered three ways, step by step in turn so that the machine's drift hits
all alike: ``no-comm`` (DDP with a no-op hook and a local optimizer step: the
bound), ``step-time`` (``register(..., overlap=False)``: the 1-bit exchange runs
in ``step()``) and ``overlapped`` (``register(...)``: it runs from DDP's hook during
backward). Timed steps are all in the compressed phase. The two distcomp runs
must end with identical parameters, or no speed is reported.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import distcomp.optim
from distcomp.bench import netns
from distcomp.models.gpt import GPT, GPTConfig
from distcomp.testing import run_ranks

try:
    from benchmarks import common
except ImportError:  # run as a script: the script's own folder is on sys.path
    import common

logger = logging.getLogger("distcomp.bench")

WORLD_SIZE = 2
MASTER_PORT = 29613
Method = Literal["no-comm", "step-time", "overlapped"]
METHODS: tuple[Method, ...] = ("no-comm", "step-time", "overlapped")


@dataclass(frozen=True)
class ExperimentConfig:
    """One run of every method."""

    bandwidth: str | None = None
    """tc rate of the link between the ranks (None: loopback, unshaped)."""
    freeze_step: int = 1
    """Warm-up steps (exact Adam) before the compressed phase that is timed."""
    steps: int = 12
    """Timed compressed-phase steps per method."""
    batch_size: int = 8
    bucket_cap_mb: float = 25.0
    """DDP's bucket cap (torch's default)."""
    optimizer_bucket_cap_mb: float = 8.0
    """The optimizer's fused-bucket cap: the unit of the exchange, started once DDP delivered all of it."""


@dataclass(frozen=True)
class ExperimentResult:
    """Median step time of each method (the slower rank per step) and the ratios to the bound."""

    method: str
    step_ms: float | None = None
    ratio_to_bound: float | None = None
    exposed_ms: float | None = None
    """Exchange time after DDP's last hook call (overlapped only)."""
    failure: str = ""


def get_configs(bandwidths: str | None) -> list[ExperimentConfig]:
    """One run per link in the comma-separated ``bandwidths`` (None: one loopback run)."""
    return [ExperimentConfig(bandwidth=b) for b in (bandwidths.split(",") if bandwidths else [None])]


# -- inside the ranks ----------------------------------------------------------------------


def _build(method: Method, cfg: ExperimentConfig) -> tuple[DDP, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    ddp = DDP(model, bucket_cap_mb=cfg.bucket_cap_mb)
    opt = distcomp.optim.OneBitAdam(
        model.parameters(), lr=1e-3, freeze_step=cfg.freeze_step, bucket_cap_mb=cfg.optimizer_bucket_cap_mb
    )
    if method == "no-comm":
        ddp.register_comm_hook(None, noop_hook)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        distcomp.optim.register(ddp, opt, overlap=method == "overlapped")
    return ddp, opt


def run_rank(rank: int, world_size: int, cfg: ExperimentConfig) -> dict[str, Any]:
    """Every method, one step of each in turn; per-step seconds, final digests and exposed times."""
    torch.set_num_threads(1)
    data, context = common.corpus(), GPTConfig().context
    runs = {m: _build(m, cfg) for m in METHODS}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    exposed: list[float] = []
    for step in range(cfg.freeze_step + cfg.steps):
        x, y = common.batch(data, rank, step, cfg.batch_size, context)
        for method, (ddp, opt) in runs.items():
            dist.barrier()
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            _, loss = ddp(x, y)
            loss.backward()
            opt.step()
            if step >= cfg.freeze_step:
                times[method].append(time.perf_counter() - start)
                if method == "overlapped":
                    exposed.append(opt.stats()["step"].get("exposed_comm_s", 0.0))
    return {
        "times": times,
        "exposed": exposed,
        "digests": {m: common.param_digest(ddp.module) for m, (ddp, _) in runs.items()},
    }


# -- the experiment --------------------------------------------------------------------------


def run_experiment(cfg: ExperimentConfig, timeout: float = 1800.0) -> list[ExperimentResult]:
    """Run every method in one job; the correctness check first, then the speeds."""
    if cfg.bandwidth is None:
        outputs = run_ranks(run_rank, WORLD_SIZE, args=(cfg,), timeout=timeout, collective_timeout=600)
    else:
        outputs = netns.run_ranks(__file__, run_rank, cfg.bandwidth, (cfg,), port=MASTER_PORT, timeout=timeout)
    digests = outputs[0]["digests"]
    if digests["overlapped"] != digests["step-time"]:
        return [ExperimentResult(m, failure="overlapped and step-time parameters differ") for m in METHODS]
    medians = {m: common.median_step([o["times"][m] for o in outputs]) for m in METHODS}
    exposed = common.median_step([o["exposed"] for o in outputs])
    return [
        ExperimentResult(
            m,
            step_ms=medians[m] * 1e3,
            ratio_to_bound=common.ratio(medians, m, "no-comm"),
            exposed_ms=exposed * 1e3 if m == "overlapped" else None,
        )
        for m in METHODS
    ]


FIGURES = [("step ms", "step_ms", ".1f"), ("x bound", "ratio_to_bound", ".2f"), ("exposed ms", "exposed_ms", ".1f")]


def main(argv: Sequence[str] | None = None) -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument(
        "--bandwidth", default=None, help="tc rates of the link between the ranks, e.g. 100mbit or 100mbit,10mbit"
    )
    parser.add_argument("--steps", type=int, default=ExperimentConfig.steps, help="timed steps per method")
    parser.add_argument("--bucket-cap-mb", type=float, default=ExperimentConfig.bucket_cap_mb, help="DDP's bucket cap")
    parser.add_argument(
        "--optimizer-bucket-cap-mb",
        type=float,
        default=ExperimentConfig.optimizer_bucket_cap_mb,
        help="the optimizer's fused-bucket cap (the unit of the exchange)",
    )
    common.add_output_args(parser)
    if netns.serve_worker(argv):  # a rank that netns.run_ranks started in its namespace
        return
    args = common.parse_args(parser, argv)
    common.log_to_console()
    report, figures = [], []
    for cfg in get_configs(args.bandwidth):
        cfg = ExperimentConfig(
            **{
                **asdict(cfg),
                "steps": args.steps,
                "bucket_cap_mb": args.bucket_cap_mb,
                "optimizer_bucket_cap_mb": args.optimizer_bucket_cap_mb,
            }
        )
        logger.info("running %s", cfg)
        results = run_experiment(cfg)
        link = cfg.bandwidth or "loopback"
        caps = f"DDP buckets {cfg.bucket_cap_mb:g} MB, optimizer buckets {cfg.optimizer_bucket_cap_mb:g} MB"
        table = common.results_table(results, ["method"], lambda r: [r.method], FIGURES)
        report.append(f"## {link} ({caps})\n\n{table}")
        figures.append({"config": asdict(cfg), "results": [asdict(r) for r in results]})
    text = "\n\n".join(report)
    print(text)
    common.write_results(
        args,
        "optim-overlap",
        title="1-bit Adam: exchange overlapped with backward vs in step()",
        command=common.command_line(__file__, argv),
        report=text,
        figures={"runs": figures},
    )


if __name__ == "__main__":
    main()
