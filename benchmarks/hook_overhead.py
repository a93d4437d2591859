"""Step time and bytes per step of every distcomp DDP hook, against plain DDP and the no-communication bound.

    python benchmarks/hook_overhead.py                      # 2 ranks on gloo over loopback
    python benchmarks/hook_overhead.py --bandwidth 100mbit  # 2 network namespaces, 100 Mbit/s each way
    python benchmarks/hook_overhead.py --bandwidth 10mbit   # slow link: fewer steps, no dense methods
    python benchmarks/hook_overhead.py --steps 20 --json out.json
    python benchmarks/hook_overhead.py --no-save             # print only; by default each run is saved as
                                                            # benchmarks/results/<date>-hook-overhead.json and .md

Every method trains its own DDP copy of the byte-level GPT (10.9M parameters)
from the same initial weights on the same batches: plain DDP (no hook), torch's
``noop_hook`` (sends nothing: the no-communication bound), and each distcomp
compressor with ``overlap=True`` (communication on a worker thread) and
``overlap=False`` (synchronous in the hook). All methods live in the same two
rank processes and their steps are interleaved round by round, so drift in the
machine's speed hits every method alike and the ratios to the bound and to
DDP, measured in the same run, are what to compare between runs.

Correctness comes first: after the warm-up, and again after the timed steps,
every method except the bound must hold identical parameters on both ranks
and a finite loss, and ``none`` must match plain DDP bit for bit. A method that
fails a check is reported as failed, without a speed.

Three step times are reported, because a shared 2-core machine is noisy:
``ms/step`` is plain wall time (median over steps of the slower rank);
``adj`` takes out the time the training thread sat runnable in the run queue
(Linux schedstat), which removes most of the noise from other processes but not
delays of communication threads; with ``overlap=True`` it also takes out the
time a rank's own communication worker held the core, so it flatters overlap on
a machine with fewer cores than busy threads: choose between the modes on wall
time. ``cpu x bound`` compares CPU
time (all threads: compute, encode/decode, loopback copies), which ignores
waiting for the link. Bytes, codec and communication times come from distcomp's
telemetry (``state.stats()``); DDP's bytes are those of a ring all-reduce of
the fp32 gradients. ``exposed ms`` is the communication that backward could not
hide: from the last hook call of a backward pass to the end of its
communication (``exposed_comm_s``).

Below :data:`netns.SLOW_LINK_BITS` a dense step takes tens of seconds on the wire (43.6 MB
at 10 Mbit/s is 35 s), so such runs default to :data:`SLOW_LINK_STEPS` timed steps
and leave out plain DDP and the methods that send dense or half-size gradients
(``--dense`` puts them back).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import distcomp
import distcomp.optim
from distcomp.bench import netns
from distcomp.bench.worker import probe_all_reduce
from distcomp.models.gpt import GPT, GPTConfig
from distcomp.testing import run_ranks

try:
    from benchmarks import common
except ImportError:  # run as a script: the script's own folder is on sys.path
    import common


logger = logging.getLogger("distcomp.bench")

WORLD_SIZE = 2
DENSE_BYTES_PER_ELEMENT = 4
OPTIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "fp16": {},
    "bf16": {},
    "powersgd": {"rank": 4},
    "topk": {"ratio": 0.01},
    "randomk": {"ratio": 0.01},
    "sign": {},
    "int8": {},
    "int4": {},
}
"""The compressors measured by default, with their options."""
TARGET_NONE_VS_DDP = 1.03
DENSE_METHODS = ("none", "fp16", "bf16")
"""Compressors that send every gradient (in fp32 or half size): left out of slow-link runs by default."""
SLOW_LINK_STEPS = 4
"""Timed steps per method on a slow link (default)."""
TARGET_POWERSGD_RATIO = 40.0
MASTER_PORT = 29517
PROBE_BYTES = 4 * 2**20
"""Size of the all-reduce that measures the link before the timed steps."""

Hook = Literal["ddp", "noop", "distcomp", "onebit_adam"]
ONEBIT_FREEZE_STEP = 2
"""1-bit Adam's exact warm-up steps: the rest of the warm-up and every timed step are in its compressed phase."""


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """One method measured in the run."""

    hook: Hook
    """``ddp``: DDP's own all-reduce; ``noop``: torch's ``noop_hook`` (sends nothing); ``distcomp``: a compressor;
    ``onebit_adam``: ``distcomp.optim.OneBitAdam`` with ``distcomp.optim.register`` (the optimizer decides
    the communication; timed in its compressed phase)."""
    compressor: str | None = None
    """The distcomp compressor (``hook="distcomp"`` only)."""
    overlap: bool = True
    """distcomp: communicate on a worker thread (True) or synchronously in the hook (False); 1-bit Adam:
    exchange the momentum during backward (True) or in ``step()`` (False)."""
    pipeline: bool = True
    """distcomp with ``overlap`` only: let bucket i+1's all-to-all overlap bucket i's all-gather (two-phase
    compressors; the others ignore it)."""
    options: tuple[tuple[str, Any], ...] = ()
    """Compressor options as ``(key, value)`` pairs (a tuple keeps the config frozen and hashable)."""

    @property
    def name(self) -> str:
        if self.hook == "ddp":
            return "DDP (no hook)"
        if self.hook == "noop":
            return "noop_hook (bound)"
        if self.hook == "onebit_adam":
            return "1-bit Adam"
        return " ".join([str(self.compressor), *(f"{k}={v}" for k, v in self.options)])

    @property
    def mode(self) -> str:
        if self.hook == "onebit_adam":
            return "overlap" if self.overlap else "step-time"
        if self.hook != "distcomp":
            return "-"
        if not self.overlap:
            return "sync"
        return "overlap" if self.pipeline else "overlap, unpipelined"

    @property
    def key(self) -> str:
        """Unique within a run."""
        return f"{self.name} [{self.mode}]"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        return cls(**{**d, "options": tuple(tuple(kv) for kv in d["options"])})


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """Settings that every method of one run shares."""

    steps: int = 10
    """Timed steps per method; the median is reported."""
    warmup: int = 4
    """Untimed steps first; compressors start at step 2, so at least 3 (their first compressed step allocates)."""
    batch: int = 8
    """Sequences per rank per step."""
    bucket_cap_mb: float = 10.0
    """DDP's bucket size; 10 MB gives the 43.6 MB of gradients several buckets."""
    bucket_cap_mb_list: tuple[float, ...] = ()
    """Per-bucket caps (DDP's ``bucket_cap_mb_list``) in the order the buckets are reduced; the bucket
    after the listed ones holds what is left, so a list that sums to just under the gradients' size makes
    the bucket that closes the backward pass small (less exposed communication). Empty: ``bucket_cap_mb``."""
    min_buckets: int = 4
    """The run fails if DDP made fewer buckets than this."""
    lr: float = 3e-4
    """AdamW learning rate."""
    seed: int = 0
    """Seed of the initial weights (the same for every method)."""
    bandwidth: str | None = None
    """tc rate of a shaped link between two network namespaces (e.g. ``100mbit``); None: loopback."""

    def __post_init__(self) -> None:
        if self.warmup < 3:
            raise ValueError(f"warmup must be >= 3 (compression starts at step 2), got {self.warmup}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.bandwidth is not None:
            netns.rate_bits(self.bandwidth)


@dataclass(frozen=True, kw_only=True)
class ExperimentResult:
    """One method's figures; all None when a correctness check failed (no speed for a wrong result)."""

    config: ExperimentConfig
    failure: str = ""
    """Why a correctness check failed; empty when all passed."""
    step_ms: float | None = None
    """Median over timed steps of the slower rank's wall-clock step time."""
    x_bound: float | None = None
    """``step_ms`` over the no-communication bound's, same run."""
    x_ddp: float | None = None
    """``step_ms`` over plain DDP's, same run."""
    adj_ms: float | None = None
    """Wall time less the time the training thread sat runnable in the run queue (Linux schedstat):
    the step time with most of the slowdown from other work on the machine taken out (and, with overlap,
    the time the rank's own communication worker held the core). Per step the smaller of the two ranks'
    values (the other rank's extra time is waiting for this one), median over steps."""
    adj_x_bound: float | None = None
    """``adj_ms`` over the bound's, same run."""
    adj_x_ddp: float | None = None
    """``adj_ms`` over plain DDP's, same run."""
    cpu_ms: float | None = None
    """Median over timed steps of the larger rank's CPU time (all its threads, user + system): the compute,
    encode/decode and loopback-copy cost, barely moved by other work; it leaves out waiting for the link."""
    cpu_x_bound: float | None = None
    """``cpu_ms`` over the bound's, same run."""
    sent_mb: float | None = None
    """MB this rank puts on the wire per step (bandwidth-optimal algorithm of each collective)."""
    ratio: float | None = None
    """Bytes of a dense fp32 all-reduce over bytes sent."""
    codec_ms: float | None = None
    """Encode/decode time per step (median over steps, mean over ranks); distcomp only."""
    comm_ms: float | None = None
    """Time waiting in collectives per step (median over steps, mean over ranks); distcomp only."""
    exposed_ms: float | None = None
    """Communication backward could not hide: from the last hook call of a backward pass to the end of its
    communication (``exposed_comm_s``; median over steps, mean over ranks); distcomp only."""
    buckets: int | None = None
    """Buckets per step as distcomp's telemetry counts them."""
    final_loss: float | None = None
    """Mean over ranks of the last timed step's loss."""
    steps_ms: tuple[float, ...] = ()
    """Every timed step (slower rank), for spread."""


def get_configs(
    compressors: Sequence[str],
    sync_for: Sequence[str],
    *,
    ddp: bool = True,
    unpipelined_for: Sequence[str] = (),
    onebit_adam: bool = False,
) -> list[ExperimentConfig]:
    """Plain DDP (if ``ddp``), the bound, then each compressor with overlap; also without overlap where
    ``sync_for`` says, and overlapped but not pipelined where ``unpipelined_for`` says; last, if
    ``onebit_adam``, 1-bit Adam with its exchange overlapped and in ``step()``."""
    configs = [ExperimentConfig(hook="ddp")] if ddp else []
    configs.append(ExperimentConfig(hook="noop"))
    for name in compressors:
        options = tuple(OPTIONS.get(name, {}).items())
        configs.append(ExperimentConfig(hook="distcomp", compressor=name, overlap=True, options=options))
        if name in unpipelined_for:
            configs.append(
                ExperimentConfig(hook="distcomp", compressor=name, overlap=True, pipeline=False, options=options)
            )
        if name in sync_for:
            configs.append(ExperimentConfig(hook="distcomp", compressor=name, overlap=False, options=options))
    if onebit_adam:
        configs += [ExperimentConfig(hook="onebit_adam", overlap=o) for o in (True, False)]
    return configs


# -- inside a rank -----------------------------------------------------------------


@dataclass(frozen=True)
class _StepTime:
    wall: float
    """Seconds, wall clock."""
    cpu: float
    """CPU seconds of the whole process (every thread, user + system)."""
    delay: float
    """Seconds the calling thread (which runs forward, backward and the optimizer) was runnable but not running."""
    loss: float


def _run_delay() -> float:
    """Seconds the calling thread has spent waiting in the run queue (0 where Linux schedstat is missing)."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


@dataclass
class _Replica:
    """One method's model, DDP wrapper, optimizer and hook state inside one rank."""

    config: ExperimentConfig
    model: GPT
    ddp: DDP
    opt: torch.optim.Optimizer
    state: Any
    """What to ``close()``: the compression state, or 1-bit Adam's hook state; None for DDP and the bound."""
    telemetry: Any
    """What reports ``stats()``: the compression state or the 1-bit optimizer; None for DDP and the bound."""

    def step(self, x: torch.Tensor, y: torch.Tensor) -> _StepTime:
        """One training step, timed."""
        start, cpu, delay = time.perf_counter(), time.process_time(), _run_delay()
        self.opt.zero_grad(set_to_none=True)
        _, loss = self.ddp(x, y)
        loss.backward()
        self.opt.step()
        return _StepTime(
            wall=time.perf_counter() - start,
            cpu=time.process_time() - cpu,
            delay=_run_delay() - delay,
            loss=loss.item(),
        )

    def digest(self) -> str:
        return common.param_digest(self.model)

    def step_stats(self) -> dict[str, float]:
        if self.telemetry is None:
            return {}
        s = self.telemetry.stats()["step"]
        return {k: float(s[k]) for k in ("sent_bytes", "ratio", "codec_s", "comm_s", "exposed_comm_s", "buckets")}


@dataclass
class _Record:
    """What one rank measured for one method (plain values: it travels as JSON)."""

    key: str
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    delay_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    stats: list[dict[str, float]] = field(default_factory=list)
    failure: str = ""
    digest: str = ""


def _build(config: ExperimentConfig, bench: BenchConfig) -> _Replica:
    torch.manual_seed(bench.seed)
    model = GPT(GPTConfig())
    # Every replica starts from the same seed: no 43.6 MB broadcast per replica (35 s at 10 Mbit/s).
    caps = list(bench.bucket_cap_mb_list) or None
    ddp = DDP(model, bucket_cap_mb=bench.bucket_cap_mb, bucket_cap_mb_list=caps, init_sync=False)
    if config.hook == "onebit_adam":
        onebit = distcomp.optim.OneBitAdam(model.parameters(), lr=bench.lr, freeze_step=ONEBIT_FREEZE_STEP)
        hook_state = distcomp.optim.register(ddp, onebit, overlap=config.overlap)
        return _Replica(config, model, ddp, onebit, hook_state, onebit)
    state = None
    if config.hook == "noop":
        ddp.register_comm_hook(None, noop_hook)
    elif config.hook == "distcomp":
        state = distcomp.register(
            ddp, config.compressor, overlap=config.overlap, pipeline=config.pipeline, **dict(config.options)
        )
    opt = torch.optim.AdamW(model.parameters(), lr=bench.lr)
    return _Replica(config, model, ddp, opt, state, state)


def _probe_link(reps: int = 3) -> float:
    """Median seconds of an all-reduce of :data:`PROBE_BYTES`: how fast the link really is."""
    return probe_all_reduce(PROBE_BYTES, reps)


def _gather_health(replicas: list[_Replica], records: list[_Record]) -> list[dict[str, tuple[str, bool]]]:
    """Every rank's ``{key: (parameter digest, loss finite)}``."""
    mine = {
        rep.config.key: (rep.digest(), all(map(math.isfinite, rec.losses)))
        for rep, rec in zip(replicas, records, strict=True)
    }
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def _verdicts(configs: Sequence[ExperimentConfig], health: list[dict[str, Any]]) -> dict[str, str]:
    """``{key: why it is wrong}`` from every rank's ``{key: (digest, finite)}``; deterministic on every rank."""
    ddp_key = next((c.key for c in configs if c.hook == "ddp"), None)
    step_time_key = next((c.key for c in configs if c.hook == "onebit_adam" and not c.overlap), None)
    out: dict[str, str] = {}
    for c in configs:
        digests = {h[c.key][0] for h in health}
        if not all(h[c.key][1] for h in health):
            out[c.key] = "non-finite loss"
        elif c.hook != "noop" and len(digests) > 1:
            out[c.key] = "ranks hold different parameters"
        elif c.compressor == "none" and ddp_key is not None and health[0][c.key][0] != health[0][ddp_key][0]:
            out[c.key] = "parameters differ from plain DDP's (must be bit-exact)"
        elif (
            c.hook == "onebit_adam" and step_time_key is not None and health[0][c.key][0] != health[0][step_time_key][0]
        ):
            out[c.key] = "parameters differ from the step-time exchange's (must be bit-exact)"
    return out


def _bucket_count(replicas: list[_Replica], minimum: int) -> int | None:
    # DDP's buckets as the hooks count them (1-bit Adam counts its own fused buckets).
    counts = {int(r.state.stats()["step"]["buckets"]) for r in replicas if r.config.hook == "distcomp"}
    if not counts:
        return None
    if min(counts) < minimum:
        raise ValueError(f"DDP made {min(counts)} buckets, fewer than {minimum}: lower --bucket-cap-mb")
    return max(counts)


def run_rank(rank: int, world_size: int, bench: BenchConfig, configs: Sequence[ExperimentConfig]) -> dict[str, Any]:
    """One rank's side of :func:`run_experiment` (module-level so that spawned processes can import it)."""
    if rank == 0:
        common.log_to_console("[rank 0] ")
    else:
        logger.setLevel(logging.WARNING)
    torch.set_num_threads(1)
    data, context = common.corpus(), GPTConfig().context
    replicas = [_build(c, bench) for c in configs]
    records = [_Record(c.key) for c in configs]
    for step in range(bench.warmup):
        x, y = common.batch(data, rank, step, bench.batch, context)
        for rep, rec in zip(replicas, records, strict=True):
            rec.losses.append(rep.step(x, y).loss)
    buckets = _bucket_count(replicas, bench.min_buckets)
    for key, why in _verdicts(configs, _gather_health(replicas, records)).items():
        logger.warning("%s failed its check after warm-up (%s): not timed", key, why)
        records[[c.key for c in configs].index(key)].failure = f"after warm-up: {why}"
    probe_s = _probe_link()
    logger.info("%d buckets; %.0f MB all-reduce in %.1f ms", buckets or -1, PROBE_BYTES / 2**20, probe_s * 1e3)
    _timed_rounds(bench, data, rank, replicas, records)
    for rep, rec in zip(replicas, records, strict=True):
        rec.digest = rep.digest()
        if rep.state is not None:
            rep.state.close()
    numel = sum(p.numel() for p in replicas[0].model.parameters())
    return {"records": [asdict(r) for r in records], "numel": numel, "buckets": buckets, "probe_s": probe_s}


def _timed_rounds(
    bench: BenchConfig, data: torch.Tensor, rank: int, replicas: list[_Replica], records: list[_Record]
) -> None:
    """Round i times step ``warmup + i`` of every method, starting from a rotating method."""
    n, context = len(replicas), GPTConfig().context
    for i in range(bench.steps):
        start = time.perf_counter()
        x, y = common.batch(data, rank, bench.warmup + i, bench.batch, context)
        for j in range(n):
            rep, rec = replicas[(i + j) % n], records[(i + j) % n]
            if rec.failure:
                continue
            dist.barrier()  # every method starts its step with the ranks in step
            t = rep.step(x, y)
            rec.seconds.append(t.wall)
            rec.cpu_seconds.append(t.cpu)
            rec.delay_seconds.append(t.delay)
            rec.losses.append(t.loss)
            rec.stats.append(rep.step_stats())
        logger.info("round %d/%d: %.1f s", i + 1, bench.steps, time.perf_counter() - start)


# -- launching the ranks -------------------------------------------------------------


def _launch_loopback(bench: BenchConfig, configs: Sequence[ExperimentConfig], timeout: float) -> list[dict[str, Any]]:
    return run_ranks(run_rank, WORLD_SIZE, args=(bench, tuple(configs)), timeout=timeout, collective_timeout=600)


def _launch_netns(bench: BenchConfig, configs: Sequence[ExperimentConfig], timeout: float) -> list[dict[str, Any]]:
    """Each rank in its own namespace, joined by a veth pair shaped to ``bench.bandwidth``."""
    assert bench.bandwidth is not None
    job = (bench, tuple(configs))
    return netns.run_ranks(__file__, run_rank, bench.bandwidth, job, port=MASTER_PORT, timeout=timeout)


# -- the experiment ------------------------------------------------------------------


def run_experiment(
    bench: BenchConfig, configs: Sequence[ExperimentConfig], timeout: float = 1800.0
) -> tuple[list[ExperimentResult], dict[str, Any]]:
    """Run every method in one job; ``(results, facts about the run)``."""
    launch = _launch_loopback if bench.bandwidth is None else _launch_netns
    load_before, revision = os.getloadavg(), common.git_revision()
    outputs = launch(bench, configs, timeout)
    results = _summarise(configs, outputs)
    probe_s = max(o["probe_s"] for o in outputs)
    wire_bytes = 2 * (WORLD_SIZE - 1) / WORLD_SIZE * PROBE_BYTES
    facts = {
        "git": revision,
        # Other work on the machine shows up as noise: record how busy it was.
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "numel": outputs[0]["numel"],
        "buckets": outputs[0]["buckets"],
        "probe_ms": probe_s * 1e3,
        "probe_gbit_s": wire_bytes * 8 / probe_s / 1e9,
    }
    return results, facts


def _summarise(configs: Sequence[ExperimentConfig], outputs: list[dict[str, Any]]) -> list[ExperimentResult]:
    """Combine the ranks' records: final checks first, then figures for the methods that passed."""
    recs = {c.key: [o["records"][i] for o in outputs] for i, c in enumerate(configs)}
    health = [
        {key: (ranks[r]["digest"], all(map(math.isfinite, ranks[r]["losses"]))) for key, ranks in recs.items()}
        for r in range(len(outputs))
    ]
    final = _verdicts(configs, health)
    failures = {
        c.key: recs[c.key][0]["failure"] or (f"after timing: {final[c.key]}" if c.key in final else "") for c in configs
    }
    ok = [c.key for c in configs if not failures[c.key]]
    wall = {key: common.median_step((r["seconds"] for r in recs[key]), max) for key in ok}
    adj = {key: common.median_step(map(_adjusted, recs[key]), min) for key in ok}
    cpu = {key: common.median_step((r["cpu_seconds"] for r in recs[key]), max) for key in ok}
    bound = next((c.key for c in configs if c.hook == "noop" and c.key in wall), None)
    ddp = next((c.key for c in configs if c.hook == "ddp" and c.key in wall), None)
    dense = 2 * (WORLD_SIZE - 1) / WORLD_SIZE * DENSE_BYTES_PER_ELEMENT * outputs[0]["numel"]
    results = []
    for c in configs:
        if failures[c.key]:
            results.append(ExperimentResult(config=c, failure=failures[c.key]))
            continue
        ranks = recs[c.key]
        sent, ratio, codec, comm, exposed, buckets = _traffic(c, ranks, dense)
        results.append(
            ExperimentResult(
                config=c,
                step_ms=wall[c.key] * 1e3,
                x_bound=common.ratio(wall, c.key, bound),
                x_ddp=common.ratio(wall, c.key, ddp),
                adj_ms=adj[c.key] * 1e3,
                adj_x_bound=common.ratio(adj, c.key, bound),
                adj_x_ddp=common.ratio(adj, c.key, ddp),
                cpu_ms=cpu[c.key] * 1e3,
                cpu_x_bound=common.ratio(cpu, c.key, bound),
                sent_mb=sent / 1e6,
                ratio=ratio,
                codec_ms=codec,
                comm_ms=comm,
                exposed_ms=exposed,
                buckets=buckets,
                final_loss=statistics.fmean(r["losses"][-1] for r in ranks),
                steps_ms=tuple(max(s) * 1e3 for s in zip(*(r["seconds"] for r in ranks), strict=True)),
            )
        )
    return results


def _adjusted(rank: dict[str, Any]) -> list[float]:
    """One rank's step times less the time its training thread sat runnable in the run queue."""
    return [w - d for w, d in zip(rank["seconds"], rank["delay_seconds"], strict=True)]


def _traffic(
    c: ExperimentConfig, ranks: list[dict[str, Any]], dense_bytes: float
) -> tuple[float, float | None, float | None, float | None, float | None, int | None]:
    """``(sent bytes, ratio, codec ms, comm ms, exposed ms, buckets)`` of one method per step."""
    if c.hook == "ddp":
        return dense_bytes, 1.0, None, None, None, None
    if c.hook == "noop":
        return 0.0, None, None, None, None, None
    stats = ranks[0]["stats"]

    def per_step_ms(key: str) -> float:
        return statistics.median(statistics.fmean(r["stats"][i][key] for r in ranks) for i in range(len(stats))) * 1e3

    sent = statistics.median(s["sent_bytes"] for s in stats)
    figures = per_step_ms("codec_s"), per_step_ms("comm_s"), per_step_ms("exposed_comm_s")
    return sent, dense_bytes / sent, *figures, int(stats[-1]["buckets"])


# -- output ------------------------------------------------------------------------


FIGURES = (
    ("ms/step", "step_ms", ".0f"),
    ("x bound", "x_bound", ".2f"),
    ("x DDP", "x_ddp", ".2f"),
    ("adj ms", "adj_ms", ".0f"),
    ("adj x bound", "adj_x_bound", ".2f"),
    ("adj x DDP", "adj_x_ddp", ".2f"),
    ("cpu x bound", "cpu_x_bound", ".2f"),
    ("MB sent/step", "sent_mb", ".2f"),
    ("ratio", "ratio", ".1f"),
    ("codec ms", "codec_ms", ".1f"),
    ("comm ms", "comm_ms", ".1f"),
    ("exposed ms", "exposed_ms", ".1f"),
)
"""The table's figures: column, :class:`ExperimentResult` field, format."""


def format_table(results: Sequence[ExperimentResult]) -> str:
    """A Markdown table, one row per method."""
    return common.results_table(results, ("method", "mode"), lambda r: (r.config.name, r.config.mode), FIGURES)


def format_targets(results: Sequence[ExperimentResult]) -> str:
    """The issue's targets, met or not, from this run's figures."""
    lines = []
    for r in results:
        c = r.config
        if c.compressor == "none" and r.x_ddp is not None and r.adj_x_ddp is not None:
            wall, adj = r.x_ddp, r.adj_x_ddp
            lines.append(
                f"- none [{c.mode}] within 3% of DDP: wall {wall:.3f}x -> {_verdict(wall <= TARGET_NONE_VS_DDP)}; "
                f"adjusted {adj:.3f}x -> {_verdict(adj <= TARGET_NONE_VS_DDP)}"
            )
        if c.compressor == "powersgd" and r.ratio is not None:
            verdict = _verdict(r.ratio >= TARGET_POWERSGD_RATIO)
            lines.append(f"- powersgd [{c.mode}] ratio >= {TARGET_POWERSGD_RATIO:.0f}x: {r.ratio:.1f}x -> {verdict}")
    return "\n".join(lines)


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = common.make_parser(__doc__)
    d = BenchConfig()
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"timed steps per method (median reported; default {d.steps}, {SLOW_LINK_STEPS} on a slow link)",
    )
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps first (>= 3)")
    p.add_argument("--batch", type=int, default=d.batch, help="sequences per rank per step")
    p.add_argument("--bucket-cap-mb", type=float, default=d.bucket_cap_mb, help="DDP bucket size")
    p.add_argument(
        "--bucket-cap-mb-list",
        default="",
        help="per-bucket caps in MiB, comma-separated, in reduction order (DDP's bucket_cap_mb_list); "
        "e.g. 13,13,13 leaves a 0.6 MiB last bucket",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="compressors to measure, comma-separated (default: all in OPTIONS; on a slow link, all but "
        f"{', '.join(DENSE_METHODS)})",
    )
    p.add_argument(
        "--dense",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure plain DDP and the dense methods, even where --methods names them (default: yes, except "
        "below 50 Mbit/s)",
    )
    p.add_argument(
        "--sync-for",
        default=None,
        help="compressors also measured with overlap=False (default: all of --methods; '' for none)",
    )
    p.add_argument(
        "--unpipelined-for",
        default="",
        help="compressors also measured overlapped but without the pipelined two-phase schedule (e.g. sign,int8)",
    )
    p.add_argument(
        "--bandwidth",
        default=None,
        help="run the ranks in two network namespaces at this tc rate (e.g. 100mbit, 1gbit); several, "
        "comma-separated, run one series each and add a table across them ('none' is loopback: "
        "none,100mbit,10mbit); default: loopback, unshaped",
    )
    p.add_argument(
        "--onebit-adam",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure distcomp.optim.OneBitAdam + register in its compressed phase, its exchange "
        "overlapped with backward and in step() (default: yes)",
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before the run is abandoned")
    common.add_output_args(p)
    return common.parse_args(p, argv)


def _is_slow(bandwidth: str) -> bool:
    try:
        return netns.rate_bits(bandwidth) < netns.SLOW_LINK_BITS
    except ValueError as exc:
        raise SystemExit(f"hook_overhead.py: {exc}") from None


def _default_methods(dense: bool) -> list[str]:
    return [m for m in OPTIONS if dense or m not in DENSE_METHODS]


def _split(csv: str) -> list[str]:
    return [s.strip() for s in csv.split(",") if s.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    if netns.serve_worker(argv):  # a rank that netns.run_ranks started in its namespace
        return 0
    args = _parse_args(argv)
    common.log_to_console()
    # SIGTERM unwinds like Ctrl-C, so namespaces and rank processes are cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Every link's arguments are checked before any run.
    series = [_series(args, link) for link in netns.parse_links(args.bandwidth)]
    reports, figures, failed = [], [], False
    for bench, configs in series:
        results, facts = run_experiment(bench, configs, timeout=args.timeout)
        summary, table, targets = describe_run(bench, facts), format_table(results), format_targets(results)
        print(f"\n{summary}\n\n{table}\n\n{targets}")
        heading = f"## {netns.link_name(bench.bandwidth)}\n\n" if len(series) > 1 else ""
        reports.append(f"{heading}{summary}\n\n{table}\n\n{targets}".rstrip())
        figures.append({"bench": asdict(bench), **facts, "results": [asdict(r) for r in results]})
        failed |= any(r.failure for r in results)
    if len(series) > 1:
        overview = format_overview(figures)
        print(f"\n{overview}")
        reports.insert(0, overview)
    links = [b.bandwidth for b, _ in series]
    common.write_results(
        args,
        "hook-overhead" + "".join(f"-{netns.link_name(b)}" for b in links if b is not None or len(links) > 1),
        title="DDP hook overhead",
        command=common.command_line(__file__, argv),
        report="\n\n".join(reports),
        figures=figures[0] if len(figures) == 1 else {"series": figures},
    )
    return 1 if failed else 0


def _series(args: argparse.Namespace, bandwidth: str | None) -> tuple[BenchConfig, list[ExperimentConfig]]:
    """One link's settings and methods: a slow link gets fewer steps and no dense methods unless told."""
    slow = bandwidth is not None and _is_slow(bandwidth)
    dense = not slow if args.dense is None else args.dense
    try:
        bench = BenchConfig(
            steps=args.steps if args.steps is not None else (SLOW_LINK_STEPS if slow else BenchConfig().steps),
            warmup=args.warmup,
            batch=args.batch,
            bucket_cap_mb=args.bucket_cap_mb,
            bucket_cap_mb_list=tuple(float(x) for x in _split(args.bucket_cap_mb_list)),
            bandwidth=bandwidth,
        )
    except ValueError as exc:
        raise SystemExit(f"hook_overhead.py: {exc}") from None
    methods = _split(args.methods) if args.methods is not None else _default_methods(dense)
    if not dense:  # named or not, a dense method on a slow link takes tens of seconds a step
        methods = [m for m in methods if m not in DENSE_METHODS]
    unknown = set(methods) - set(distcomp.available_compressors())
    if unknown:
        raise SystemExit(f"unknown compressors {sorted(unknown)}; available: {distcomp.available_compressors()}")
    sync_for = methods if args.sync_for is None else _split(args.sync_for)
    configs = get_configs(
        methods, sync_for, ddp=dense, unpipelined_for=_split(args.unpipelined_for), onebit_adam=args.onebit_adam
    )
    return bench, configs


def format_overview(series: Sequence[dict[str, Any]]) -> str:
    """One table across the links: each method's step time over the bound of its own series, and its bytes."""
    links = [netns.link_name(s["bench"]["bandwidth"]) for s in series]
    table = common.across_links(("method", "mode"), links, [map(_overview_row, s["results"]) for s in series])
    return (
        "All links, one run: each method's median step over the no-communication bound measured in the same "
        f"series (- : not measured on that link)\n\n{table}"
    )


def _overview_row(r: dict[str, Any]) -> tuple[tuple[str, str], str, str | None]:
    c = ExperimentConfig.from_dict(r["config"])
    cell = "failed" if r["failure"] else common.fmt(r["x_bound"], ".2f")
    return (c.name, c.mode), cell, None if r["sent_mb"] is None else f"{r['sent_mb']:.2f}"


def describe_run(bench: BenchConfig, facts: dict[str, Any]) -> str:
    """One line: the model, the link and its measured speed, the steps, and how busy the machine was."""
    link = "loopback (unshaped)" if bench.bandwidth is None else f"2 network namespaces, tbf {bench.bandwidth}"
    caps = ",".join(f"{c:g}" for c in bench.bucket_cap_mb_list) or f"{bench.bucket_cap_mb:g}"
    return (
        f"{facts['numel'] / 1e6:.1f}M parameters, {facts['buckets']} buckets (caps {caps} MiB), "
        f"{WORLD_SIZE} ranks on gloo, "
        f"{link}; link probe: {PROBE_BYTES / 2**20:.0f} MB all-reduce {facts['probe_ms']:.1f} ms "
        f"(~{facts['probe_gbit_s']:.2f} Gbit/s on the wire); median of {bench.steps} steps after {bench.warmup}; "
        f"load average before/after {facts['load_average_before'][0]:.1f}/{facts['load_average_after'][0]:.1f}"
    )


if __name__ == "__main__":
    sys.exit(main())
