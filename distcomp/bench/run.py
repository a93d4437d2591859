"""Run the cells of a scaling benchmark: for each host count and link, hosts as network namespaces on a
bridge, the job started through ``distcomp launch`` with a hostfile, as a user would start it.

Each cell is one job of :mod:`distcomp.bench.worker` on ``hosts`` ranks (one
per host). The launcher reaches the hosts through an ``ssh`` stand-in put first
on its ``PATH``, which runs the command inside the namespace named by the host
(what ssh does on a real host). Namespaces, bridge and qdiscs are removed on
every way out: an error, Ctrl-C, SIGTERM or SIGHUP (:func:`netns.signals_raise`);
a run killed with SIGKILL leaves them to the next run, which removes them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distcomp.bench import netns
from distcomp.bench.methods import Method, model_config

logger = logging.getLogger("distcomp.bench")

MASTER_PORT = 29731
SMOOTH = 5
"""Steps in the trailing mean that time-to-loss compares (paired: every method sees the same batches)."""


@dataclass(frozen=True, kw_only=True)
class CellConfig:
    """What every cell of a run shares."""

    warmup: int = 3
    """Untimed rounds first (compressors start at step 2; the optimizers leave their exact phase here)."""
    steps: int = 6
    """Timed rounds per method and cell; the median is reported."""
    loss_steps: int = 0
    """N of time-to-loss: the fastest link's cell runs ``1.5 N`` rounds after the warm-up and records every
    loss."""
    global_batch: int = 16
    """Sequences per step over all ranks (each rank takes ``global_batch / hosts``): the same for every
    host count, so that the loss curves compare."""
    lr: float = 3e-4
    bucket_cap_mb: float = 10.0
    """DDP's bucket size: 10 MB gives the 43.6 MB of gradients 5 buckets to overlap."""
    seed: int = 0
    threads: int = 1
    """torch threads per rank."""
    timeout_s: float = 3600.0
    """Longest a cell may run before it is stopped."""
    model: str = "gpt"
    """A key of :data:`~distcomp.bench.methods.MODELS`."""


@dataclass(frozen=True)
class Cell:
    """One job: ``hosts`` ranks on links of ``rate`` (None: unshaped)."""

    hosts: int
    rate: str | None
    methods: tuple[Method, ...]
    loss_steps: int = 0
    group: int = 0
    """Which of the jobs this (hosts, link) pair is split into when its replicas would not fit in memory."""

    @property
    def name(self) -> str:
        return f"{self.hosts}h-{netns.link_name(self.rate)}" + (f"-{self.group + 1}" if self.group else "")


@dataclass
class MethodFigures:
    """One method in one cell, over its timed steps (all None when it failed a correctness check)."""

    name: str
    failure: str = ""
    step_s: float | None = None
    """Median over timed steps of the slowest rank's step."""
    spread: float | None = None
    """Interquartile range of those steps over their median."""
    tx_mb: float | None = None
    """MB per step this rank's interface sent (median over steps, mean over ranks)."""
    stats_mb: float | None = None
    """MB per step distcomp's telemetry says it sent (``stats()``), plus what the wrapper sends on its own
    (DDP's all-reduce, FSDP's parameter all-gathers; see :func:`_add_untracked_bytes`)."""
    codec_s: float | None = None
    exposed_s: float | None = None
    tokens_s: float | None = None
    losses: list[float] = field(default_factory=list)
    """Mean over ranks of every step's loss, warm-up included."""
    bound_s: float | None = None
    """The no-communication bound's median step in the same job: every ratio to the bound uses it."""
    ddp_s: float | None = None
    """Plain DDP's median step in the same job."""


@dataclass
class CellResult:
    """What a cell measured."""

    hosts: int
    rate: str | None
    seconds: float
    probe: dict[str, float]
    numel: int
    methods: dict[str, MethodFigures]

    @property
    def link(self) -> str:
        return netns.link_name(self.rate)


def _quartile_spread(values: Sequence[float]) -> float:
    if len(values) < 4:
        return (max(values) - min(values)) / statistics.median(values)
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / q[1]


def summarise(ranks: Sequence[dict[str, Any]], cfg: CellConfig, context: int) -> dict[str, MethodFigures]:
    """Every method's figures from the ranks' records."""
    out = {}
    for name in ranks[0]["records"]:
        recs = [r["records"][name] for r in ranks]
        fig = MethodFigures(name, failure=recs[0]["failure"])
        fig.losses = [statistics.fmean(s) for s in zip(*(r["losses"] for r in recs))]
        if not fig.failure:
            _fill(fig, recs, cfg, context)
        _add_untracked_bytes(fig, len(ranks), ranks[0]["numel"], ranks[0].get("root_numel", 0))
        out[name] = fig
    for fig in out.values():
        fig.bound_s = out["noop"].step_s if "noop" in out else None
        fig.ddp_s = out["ddp"].step_s if "ddp" in out else None
    return out


def _add_untracked_bytes(fig: MethodFigures, world: int, numel: int, root: int) -> None:
    """What the counter should also see that no telemetry counts: DDP's ring all-reduce of the fp32 gradients,
    FSDP's fp32 all-gathers of the parameters (twice a step for the blocks, which reshard after forward; once
    for the root's own) and plain FSDP's reduce-scatter, which gloo runs as an all-reduce (its bytes: twice a
    reduce-scatter's)."""
    if fig.failure:
        return
    share = (world - 1) / world * 4 / 1e6
    gathers = (2 * (numel - root) + root) * share
    if fig.name == "ddp":
        fig.stats_mb = 2 * numel * share
    elif fig.name == "fsdp":
        fig.stats_mb = gathers + 2 * numel * share  # gloo runs FSDP's reduce-scatter as an all-reduce
    elif fig.name.startswith("fsdp-"):
        fig.stats_mb = (fig.stats_mb or 0.0) + gathers


def _fill(fig: MethodFigures, recs: Sequence[dict[str, Any]], cfg: CellConfig, context: int) -> None:
    w = cfg.warmup
    steps = [max(s) for s in zip(*(r["seconds"][w:] for r in recs))]
    fig.step_s = statistics.median(steps)
    fig.spread = _quartile_spread(steps)
    fig.tokens_s = cfg.global_batch * context / fig.step_s
    tx = [statistics.median(r["tx_bytes"][w:]) for r in recs]
    fig.tx_mb = statistics.fmean(tx) / 1e6 if min(tx) >= 0 else None
    stats = [r["stats"][w:] for r in recs]
    if stats[0] and stats[0][0]:
        mean_median = lambda key: statistics.fmean(statistics.median(s[key] for s in st) for st in stats)  # noqa: E731
        fig.stats_mb = mean_median("sent_bytes") / 1e6
        fig.codec_s = mean_median("codec_s")
        fig.exposed_s = mean_median("exposed_comm_s")


# -- one cell ------------------------------------------------------------------------------


def _hostfile(net: netns.Network) -> str:
    return "".join(f"{h.namespace} slots=1 addr={h.address} ifname={h.iface}\n" for h in net.hosts)


def _job(cell: Cell, cfg: CellConfig, folder: Path) -> dict[str, Any]:
    return {
        **asdict(cfg),
        "loss_steps": cell.loss_steps,
        "methods": [asdict(m) for m in cell.methods],
        "progress": str(folder / "progress"),
        "rate": cell.rate,
        "collective_timeout_s": cfg.timeout_s,
    }


def launch_argv(folder: Path) -> list[str]:
    """``distcomp launch`` over ssh with the cell's hostfile, running the worker on every host."""
    return [
        sys.executable,
        "-m",
        "distcomp",
        "launch",
        "--hostfile",
        str(folder / "hosts"),
        "--launcher",
        "ssh",
        "--master-port",
        str(MASTER_PORT),
        "--stop-timeout",
        "10",
        "-m",
        "distcomp.bench.worker",
        str(folder / "job.json"),
    ]


def _stop(proc: subprocess.Popen) -> None:
    """Stop the launcher as a scheduler would (SIGTERM: it stops its nodes), then kill what is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _progress(folder: Path) -> int:
    try:
        lines = (folder / "progress").read_text().split()
    except OSError:
        return 0
    return int(lines[-2]) if len(lines) >= 2 else 0


def run_cell(cell: Cell, cfg: CellConfig, folder: Path, on_round: Callable[[int], None]) -> CellResult:
    """Run ``cell``; ``on_round(done)`` is called as rounds finish. Raises with the launcher's log on failure."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.json").write_text(json.dumps(_job(cell, cfg, folder)))
    shim = netns.install_ssh_standin(folder / "bin").parent
    start = time.monotonic()
    # Created unshaped: each rank shapes its own egress after the warm-up (see worker.shape).
    with netns.hosts_on_bridge(cell.hosts, None) as net:
        (folder / "hosts").write_text(_hostfile(net))
        env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ.get('PATH', '')}"}
        with (folder / "launch.log").open("w") as log:
            proc = subprocess.Popen(launch_argv(folder), env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                _wait(proc, folder, start + cfg.timeout_s, on_round)
            finally:
                _stop(proc)
                shutil.rmtree(shim, ignore_errors=True)
    return read_cell(folder, cell.hosts, cell.rate, cfg, time.monotonic() - start)


def read_cell(folder: Path, hosts: int, rate: str | None, cfg: CellConfig, seconds: float) -> CellResult:
    """A finished cell's result from its ranks' records (also how ``--report`` recomputes a run's figures)."""
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(hosts)]
    return CellResult(
        hosts,
        rate,
        seconds,
        max((r["probe"] for r in ranks), key=lambda p: p["large_s"]),
        ranks[0]["numel"],
        summarise(ranks, cfg, model_config(cfg.model).context),
    )


def _wait(proc: subprocess.Popen, folder: Path, deadline: float, on_round: Callable[[int], None]) -> None:
    done = 0
    while proc.poll() is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"cell {folder.name} did not finish in time; its log: {folder / 'launch.log'}")
        now = _progress(folder)
        if now > done:
            on_round(now - done)
            done = now
        time.sleep(0.5)
    if proc.returncode != 0:
        tail = (folder / "launch.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"cell {folder.name} failed (launcher exit {proc.returncode}); end of its log:\n{tail}")
    on_round(_progress(folder) - done)
