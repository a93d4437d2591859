"""Step time, bytes per step and memory of distcomp's FSDP2 compression, against plain FSDP2 in the same run.

    python benchmarks/fsdp.py            # 2 ranks on gloo over loopback, FSDP2
    python benchmarks/fsdp.py --hsdp     # also 4 ranks as a 2x2 HSDP mesh (replicate, shard)
    python benchmarks/fsdp.py --hsdp --bandwidth 100mbit   # 2 "hosts" (network namespaces) on a 100 Mbit/s link
    python benchmarks/fsdp.py --no-save  # print only; by default each run is saved as
                                         # benchmarks/results/<date>-fsdp.json and .md

Every method trains its own copy of the byte-level GPT, ``fully_shard`` per
transformer block and once more at the root, from the same initial weights on
the same batches: plain FSDP2 (no custom reduce-scatter) and each distcomp
compressor through ``distcomp.fsdp.register``. All methods live in the same
rank processes and their timed steps are interleaved round by round (starting
from a rotating method), so drift in the machine's speed hits every method
alike; the ratios to plain FSDP2 of the same run are what to compare.

Warm-up runs method by method, so the memory a method keeps (its model,
optimizer state, error-feedback residuals, buffers) shows as the growth of the
rank's resident set while it is built and warmed up (``held MB``). During each
timed step a sampler thread reads the resident set every millisecond;
``peak MB`` is the step's high-water mark over the resident set at its start
(the transient buffers of the step), largest over steps and ranks. The
process-wide high-water mark (``ru_maxrss``) of each rank is reported too.
Resident-set figures include the allocator's slack and are rough; ``EF MB``
(``state.stats()["ef_bytes"]``) is exact.

With ``--hsdp``, a second job of 4 ranks compares plain HSDP (``fully_shard``
on a 2x2 mesh) with a 1-D ``fully_shard`` on the shard sub-mesh whose replica
all-reduce is compressed (``register(..., replicate_group=...)``).

With ``--bandwidth RATE`` the ranks run on two "hosts": network namespaces
on a bridge, capped at RATE each way (``distcomp/bench/netns.py``). FSDP2
puts one rank on each host, so every collective (parameter all-gathers too)
crosses the link. HSDP puts two ranks on each host, ranks 0, 1 on the first and
2, 3 on the second, so each shard group (a row of the (replicate, shard) mesh)
stays inside a host, where traffic is not shaped, and only the replica
all-reduce crosses the link: the slow inter-node link of a real cluster.
``link MB/step`` is what a host put on the link per step, read from its veth's
transmit counter (TCP/IP headers included).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import resource
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import distcomp
import distcomp.fsdp
from distcomp.bench import netns
from distcomp.models.gpt import GPT, GPTConfig
from distcomp.testing import run_ranks

try:
    from benchmarks import common
except ImportError:  # run as a script: the script's own folder is on sys.path
    import common

logger = logging.getLogger("distcomp.bench")

DENSE_BYTES_PER_ELEMENT = 4
PAGE = resource.getpagesize()
HOSTS = 2
"""Hosts (network namespaces) of a ``--bandwidth`` run."""
MASTER_PORT = 29518
PROBE_BYTES = 4 * 2**20
"""Size of the message that measures the shaped link before the timed steps."""


@dataclass(frozen=True, kw_only=True)
class Method:
    """One method of the run: plain FSDP2/HSDP when ``compressor`` is None."""

    compressor: str | None = None
    error_feedback: str = "fp32"
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        if self.compressor is None:
            return "plain"
        parts = [self.compressor, *(f"{k}={v}" for k, v in self.options)]
        if self.error_feedback != "fp32":
            parts.append(f"ef={self.error_feedback}")
        return " ".join(parts)


FSDP_METHODS = (
    Method(),
    Method(compressor="none"),
    Method(compressor="bf16"),
    Method(compressor="int8"),
    Method(compressor="int8", error_feedback="bf16"),
    Method(compressor="int8", error_feedback="none"),
    Method(compressor="sign"),
    Method(compressor="topk", options=(("ratio", 0.01),)),
)
"""FSDP2 methods measured by default; plain FSDP2 first (the baseline)."""
HSDP_METHODS = (Method(), Method(compressor="powersgd", options=(("rank", 4),)), Method(compressor="int8"))
"""HSDP methods (``--hsdp``); plain HSDP first."""


@dataclass(frozen=True, kw_only=True)
class Bench:
    """Settings every method of a run shares."""

    steps: int = 8
    """Timed steps per method; the median is reported."""
    warmup: int = 3
    """Untimed steps first; compressors start compressing at step 2, so at least 3."""
    batch: int = 8
    """Sequences per rank per step."""
    d_model: int = GPTConfig().d_model
    n_layer: int = GPTConfig().n_layer
    context: int = GPTConfig().context
    lr: float = 3e-4
    seed: int = 0

    def gpt(self) -> GPTConfig:
        """The GPT of this width and depth (defaults: the model of benchmarks/hook_overhead.py)."""
        heads = next(h for h in (6, 4, 2, 1) if self.d_model % h == 0)
        return GPTConfig(d_model=self.d_model, n_layer=self.n_layer, context=self.context, n_head=heads)


@dataclass(frozen=True, kw_only=True)
class Result:
    """One method's figures; None where a figure does not apply or the method failed."""

    method: str
    failure: str = ""
    step_ms: float | None = None
    """Median over timed steps of the slower rank's wall-clock step time."""
    x_plain: float | None = None
    """``step_ms`` over plain FSDP2's (HSDP's), same run."""
    sent_mb: float | None = None
    """MB this rank sends per step for the gradient reduction (all-gathers of parameters not counted)."""
    ratio: float | None = None
    """Plain fp32 reduction's bytes over ``sent_mb``."""
    ef_mb: float | None = None
    """Error-feedback residuals per rank (``stats()["ef_bytes"]``)."""
    held_mb: float | None = None
    """Resident-set growth while the method was built and warmed up (largest rank)."""
    peak_mb: float | None = None
    """Largest step high-water mark over the resident set at the step's start (largest rank)."""
    final_loss: float | None = None
    """Mean over ranks of the last timed step's loss."""
    steps_ms: tuple[float, ...] = ()
    link_mb: float | None = None
    """With ``--bandwidth``: MB a host put on the shaped link per step (median over steps, busier host)."""


# -- inside a rank -----------------------------------------------------------------


def _rss() -> int:
    """Bytes of the process's resident set now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class _PeakSampler:
    """Highest resident set seen between :meth:`start` and :meth:`stop`, read every millisecond."""

    def __init__(self) -> None:
        self._peak = 0
        self._running = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        self._peak = start = _rss()
        self._running.set()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return start

    def _loop(self) -> None:
        while self._running.is_set():
            self._peak = max(self._peak, _rss())
            time.sleep(0.001)

    def stop(self) -> int:
        self._running.clear()
        assert self._thread is not None
        self._thread.join()
        return max(self._peak, _rss())


def _tx_bytes(iface: str) -> int:
    """Bytes ``iface`` has transmitted, from this network namespace's ``/proc/net/dev``."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, counters = line.partition(":")
            if name.strip() == iface:
                return int(counters.split()[8])  # 8 receive counters, then transmit bytes
    raise RuntimeError(f"no interface {iface!r} in /proc/net/dev: is this rank inside its network namespace?")


def _probe_link(rank: int, world: int, reps: int = 3) -> float:
    """Median seconds for :data:`PROBE_BYTES` from rank 0 to the first rank of the other host, and a reply back."""
    peer = world // HOSTS
    payload, ack = torch.ones(PROBE_BYTES // 4), torch.zeros(1)
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        if rank == 0:
            dist.send(payload, peer)
            dist.recv(ack, peer)
        elif rank == peer:
            dist.recv(payload, 0)
            dist.send(ack, 0)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _check_hosts(rank: int, world: int) -> None:
    """Refuse an HSDP mesh whose shard groups cross hosts: only the replica all-reduce may use the slow link."""
    per_host = world // HOSTS
    mesh = init_device_mesh("cpu", (HOSTS, per_host), mesh_dim_names=("replicate", "shard"))
    shard = dist.get_process_group_ranks(mesh.get_group("shard"))
    replicate = dist.get_process_group_ranks(mesh.get_group("replicate"))
    if {r // per_host for r in shard} != {rank // per_host} or len({r // per_host for r in replicate}) != HOSTS:
        raise RuntimeError(
            f"rank {rank}: shard group {shard} / replica group {replicate} do not match hosts of {per_host} "
            "consecutive ranks; launch the ranks of one host with consecutive numbers"
        )
    logger.info("shard group %s inside one host, replica group %s across the link", shard, replicate)


@dataclass
class _Replica:
    method: Method
    model: GPT
    opt: torch.optim.Optimizer
    state: Any
    seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    sent: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    link: list[int] = field(default_factory=list)
    held: int = 0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One training step; returns its wall time and records the loss and bytes sent."""
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        _, loss = self.model(x, y)
        assert loss is not None
        loss.backward()
        self.opt.step()
        wall = time.perf_counter() - start
        self.losses.append(loss.item())
        if self.state is not None:
            self.sent.append(float(self.state.stats()["step"]["sent_bytes"]))
        return wall


def _build(method: Method, bench: Bench, hsdp: bool) -> _Replica:
    """The GPT sharded per block; FSDP2 on all ranks, or HSDP (plain: 2-D mesh, compressed: shard sub-mesh)."""
    torch.manual_seed(bench.seed)
    model = GPT(bench.gpt())
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")) if hsdp else None
    shard_mesh = mesh if mesh is None or method.compressor is None else mesh["shard"]
    if shard_mesh is None:
        shard_mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=shard_mesh)
    fully_shard(model, mesh=shard_mesh)
    state = None
    if method.compressor is not None:
        extra: dict[str, Any] = {"replicate_group": mesh.get_group("replicate")} if mesh is not None else {}
        if mesh is None:
            extra["error_feedback"] = method.error_feedback
        state = distcomp.fsdp.register(model, method.compressor, **extra, **dict(method.options))
    opt = torch.optim.AdamW(model.parameters(), lr=bench.lr)
    return _Replica(method, model, opt, state)  # type: ignore[arg-type]


def run_rank(
    rank: int, world_size: int, bench: Bench, methods: Sequence[Method], hsdp: bool, iface: str | None = None
) -> dict[str, Any]:
    """One rank's side of a run: warm each method up in turn, then the interleaved timed rounds.

    ``iface`` names the rank's end of the shaped link in a ``--bandwidth`` run: each step's bytes on it are
    recorded and the link is measured once before the timed steps.
    """
    if rank == 0:
        common.log_to_console("[rank 0] ")
    else:
        logger.setLevel(logging.WARNING)
    torch.set_num_threads(1)
    if hsdp and iface is not None:
        _check_hosts(rank, world_size)
    data, context = common.corpus(), bench.context
    # A throwaway tiny replica first: one-time costs (lazy kernels, gloo buffers) would otherwise land in the
    # first method's held memory.
    tiny = Bench(d_model=32, n_layer=1, context=bench.context, batch=1)
    for method in methods:
        rep = _build(method, tiny, hsdp)
        rep.step(*common.batch(data, rank, 0, 1, context))
        if rep.state is not None:
            rep.state.close()
    del rep
    replicas = []
    for method in methods:
        before = _rss()
        rep = _build(method, bench, hsdp)
        for step in range(bench.warmup):
            rep.step(*common.batch(data, rank, step, bench.batch, context))
        rep.held = _rss() - before
        replicas.append(rep)
        logger.info("%s warmed up", method.name)
    probe_s = None
    if iface is not None:
        probe_s = _probe_link(rank, world_size)
        logger.info("link probe: %.0f MB in %.0f ms", PROBE_BYTES / 2**20, probe_s * 1e3)
    sampler = _PeakSampler()
    n = len(replicas)
    for i in range(bench.steps):
        x, y = common.batch(data, rank, bench.warmup + i, bench.batch, context)
        for j in range(n):
            rep = replicas[(i + j) % n]
            dist.barrier()  # every method starts its step with the ranks in step
            tx = _tx_bytes(iface) if iface is not None else 0
            base = sampler.start()
            rep.seconds.append(rep.step(x, y))
            rep.peaks.append(sampler.stop() - base)
            if iface is not None:
                dist.barrier()  # every rank of the host is done: the step's traffic is all counted
                rep.link.append(_tx_bytes(iface) - tx)
        logger.info("round %d/%d", i + 1, bench.steps)
    out = []
    for rep in replicas:
        ef = int(rep.state.stats().get("ef_bytes", 0)) if rep.state is not None else 0
        records = {k: getattr(rep, k) for k in ("seconds", "losses", "peaks", "link", "held")}
        # Bytes of the timed steps only: the warm-up's first steps are not compressed yet.
        out.append({**records, "sent": rep.sent[bench.warmup :], "ef_bytes": ef})
        if rep.state is not None:
            rep.state.close()
    numel = sum(p.numel() for p in replicas[0].model.parameters())
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"records": out, "numel": numel, "maxrss": maxrss, "probe_s": probe_s}


# -- launching the ranks -------------------------------------------------------------


def _launch_netns(
    bench: Bench, methods: Sequence[Method], hsdp: bool, world: int, bandwidth: str, timeout: float
) -> list[dict[str, Any]]:
    """``world // HOSTS`` consecutive ranks in each of two namespaces joined by a link shaped to ``bandwidth``."""
    per_host = world // HOSTS
    with netns.shaped_link(bandwidth) as link, tempfile.TemporaryDirectory() as tmp:
        ifaces = [link.hosts[r // per_host].iface for r in range(world)]
        results = [str(Path(tmp) / f"rank{r}.json") for r in range(world)]
        job = {
            "bench": asdict(bench),
            "methods": [asdict(m) for m in methods],
            "hsdp": hsdp,
            "world": world,
            "init_method": f"tcp://{link.hosts[0].address}:{MASTER_PORT}",
            "ifaces": ifaces,
            "results": results,
        }
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(job))
        hosts = [rank // per_host for rank in range(world)]
        link.run_workers(str(Path(__file__).resolve()), str(job_path), hosts, timeout)
        return [json.loads(Path(r).read_text()) for r in results]


def _worker_main(job_path: str, rank: int) -> None:
    """A rank started by :func:`_launch_netns` inside its host's namespace."""
    job = json.loads(Path(job_path).read_text())
    bench = Bench(**job["bench"])
    methods = [Method(**{**m, "options": tuple(tuple(o) for o in m["options"])}) for m in job["methods"]]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=job["init_method"],
        rank=rank,
        world_size=job["world"],
        timeout=datetime.timedelta(seconds=600),
    )
    try:
        out = run_rank(rank, job["world"], bench, methods, job["hsdp"], job["ifaces"][rank])
        dist.barrier()  # no rank tears down while another still talks to it
    finally:
        dist.destroy_process_group()
    Path(job["results"][rank]).write_text(json.dumps(out))


# -- the experiment ------------------------------------------------------------------


def run(
    bench: Bench, methods: Sequence[Method], hsdp: bool, timeout: float, bandwidth: str | None = None
) -> tuple[list[Result], dict[str, Any]]:
    """One job of 2 (FSDP2) or 4 (HSDP 2x2) ranks, over loopback or, with ``bandwidth``, two shaped hosts."""
    world = 4 if hsdp else 2
    load_before = os.getloadavg()[0]
    if bandwidth is None:
        args = (bench, tuple(methods), hsdp)
        outputs = run_ranks(run_rank, world, args=args, timeout=timeout, collective_timeout=600)
    else:
        outputs = _launch_netns(bench, methods, hsdp, world, bandwidth, timeout)
    numel = outputs[0]["numel"]
    if hsdp:  # ring all-reduce of each rank's fp32 shard over the 2 replicas
        dense = 2 * (2 - 1) / 2 * DENSE_BYTES_PER_ELEMENT * numel / (world // 2)
    else:  # reduce-scatter of the fp32 gradients
        dense = (world - 1) / world * DENSE_BYTES_PER_ELEMENT * numel
    wall = {}
    results = []
    for i, m in enumerate(methods):
        ranks = [o["records"][i] for o in outputs]
        if not all(math.isfinite(loss) for r in ranks for loss in r["losses"]):
            results.append(Result(method=m.name, failure="non-finite loss"))
            continue
        wall[m.name] = common.median_step((r["seconds"] for r in ranks), max)
        sent = statistics.median(ranks[0]["sent"]) if m.compressor is not None else dense
        results.append(
            Result(
                method=m.name,
                step_ms=wall[m.name] * 1e3,
                x_plain=common.ratio(wall, m.name, methods[0].name),
                sent_mb=sent / 1e6,
                ratio=dense / sent if sent else None,
                ef_mb=max(r["ef_bytes"] for r in ranks) / 1e6 if m.compressor is not None else None,
                held_mb=max(r["held"] for r in ranks) / 1e6,
                peak_mb=max(max(r["peaks"]) for r in ranks) / 1e6,
                final_loss=statistics.fmean(r["losses"][-1] for r in ranks),
                steps_ms=tuple(max(s) * 1e3 for s in zip(*(r["seconds"] for r in ranks), strict=True)),
                link_mb=common.median_step((r["link"] for r in ranks), max) / 1e6 if bandwidth else None,
            )
        )
    facts: dict[str, Any] = {
        "ranks": world,
        "numel": numel,
        "maxrss_mb": [o["maxrss"] / 1e6 for o in outputs],
        # Other work on the machine shows up as noise: record how busy it was.
        "load_average": [load_before, os.getloadavg()[0]],
    }
    if bandwidth is not None:
        probe_s = outputs[0]["probe_s"]
        facts.update(bandwidth=bandwidth, probe_ms=probe_s * 1e3, probe_mbit_s=PROBE_BYTES * 8 / probe_s / 1e6)
    return results, facts


# -- output ------------------------------------------------------------------------


FIGURES = (
    ("ms/step", "step_ms", ".0f"),
    ("x plain", "x_plain", ".2f"),
    ("MB sent/step", "sent_mb", ".3f"),
    ("ratio", "ratio", ".1f"),
    ("EF MB", "ef_mb", ".2f"),
    ("held MB", "held_mb", ".0f"),
    ("peak MB", "peak_mb", ".1f"),
    ("final loss", "final_loss", ".5f"),
)
"""The table's figures: column, :class:`Result` field, format."""
LINK_FIGURES = (*FIGURES[:3], ("link MB/step", "link_mb", ".2f"), *FIGURES[3:])
"""The figures of a ``--bandwidth`` run: also the bytes on the shaped link."""


def _where(facts: dict[str, Any]) -> str:
    """How the ranks talk: loopback, or the shaped link, its measured speed and what crosses it."""
    if "bandwidth" not in facts:
        return "gloo over loopback"
    per_host = facts["ranks"] // HOSTS
    crossing = "every collective crosses it" if per_host == 1 else "shard groups inside a host, replicas across"
    return (
        f"gloo, {per_host} rank(s) on each of {HOSTS} network namespaces joined by a tbf {facts['bandwidth']} link "
        f"({crossing}); link probe: {PROBE_BYTES / 2**20:.0f} MB one way in {facts['probe_ms']:.0f} ms "
        f"(~{facts['probe_mbit_s']:.0f} Mbit/s)"
    )


def describe(label: str, bench: Bench, facts: dict[str, Any]) -> str:
    """One line: the layout, model size, steps and each rank's process high-water mark."""
    rss = ", ".join(f"{x:.0f}" for x in facts["maxrss_mb"])
    return (
        f"{label}: {facts['numel'] / 1e6:.2f}M parameters, {facts['ranks']} ranks on {_where(facts)}; "
        f"median of {bench.steps} interleaved steps after {bench.warmup} warm-up; ru_maxrss per rank (MB): {rss}; "
        f"load average before/after {facts['load_average'][0]:.1f}/{facts['load_average'][1]:.1f}"
    )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = common.make_parser(__doc__)
    d = Bench()
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps per method (median reported)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps first (>= 3)")
    p.add_argument("--batch", type=int, default=d.batch, help="sequences per rank per step")
    p.add_argument("--d-model", type=int, default=d.d_model, help="width of the GPT")
    p.add_argument("--layers", type=int, default=d.n_layer, help="transformer blocks (one FSDP module each)")
    p.add_argument("--context", type=int, default=d.context, help="tokens per sequence")
    p.add_argument("--hsdp", action="store_true", help="also run 4 ranks as a 2x2 HSDP mesh")
    p.add_argument(
        "--bandwidth",
        default=None,
        help="run the ranks on two network namespaces joined by a link of this tc rate "
        "(e.g. 100mbit, 1gbit); default: loopback, unshaped",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before a job is abandoned")
    p.add_argument("--worker", default=None, metavar="JOB", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    common.add_output_args(p)
    return common.parse_args(p, argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.worker is not None:
        _worker_main(args.worker, args.rank)  # rank 0 logs with its rank as prefix
        return 0
    common.log_to_console()
    if args.warmup < 3 or args.steps < 1:
        raise SystemExit("fsdp.py: --warmup must be >= 3 (compression starts at step 2) and --steps >= 1")
    if args.bandwidth is not None:
        try:
            netns.rate_bits(args.bandwidth)
        except ValueError as exc:
            raise SystemExit(f"fsdp.py: {exc}") from None
        # SIGTERM unwinds like Ctrl-C, so namespaces and rank processes are cleaned up.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bench = Bench(
        steps=args.steps,
        warmup=args.warmup,
        batch=args.batch,
        d_model=args.d_model,
        n_layer=args.layers,
        context=args.context,
    )
    revision = common.git_revision()
    jobs = [("FSDP2", FSDP_METHODS, False)] + ([("HSDP 2x2", HSDP_METHODS, True)] if args.hsdp else [])
    sections, figures, failed = [], {}, False
    for label, methods, hsdp in jobs:
        results, facts = run(bench, methods, hsdp, args.timeout, args.bandwidth)
        figure_columns = FIGURES if args.bandwidth is None else LINK_FIGURES
        table = common.results_table(results, ("method",), lambda r: (r.method,), figure_columns)
        sections.append(f"{describe(label, bench, facts)}\n\n{table}")
        figures[label] = {**facts, "results": [asdict(r) for r in results]}
        failed = failed or any(r.failure for r in results)
    report = "\n\n".join(sections)
    print(f"\n{report}")
    shaped = args.bandwidth is not None
    common.write_results(
        args,
        "fsdp" if not shaped else f"fsdp-{args.bandwidth}",
        title="FSDP2 / HSDP compression" + (f" on a {args.bandwidth} link" if shaped else ""),
        command=common.command_line(__file__, argv),
        report=report,
        figures={"git": revision, "bench": asdict(bench), **figures},
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
