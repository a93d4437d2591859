"""One rank of a ``distcomp bench`` cell: ``python -m distcomp.bench.worker JOB.json`` (started by
``distcomp launch``; the job file says what to run).

Every method's replica lives in this process and the methods take their steps
in turn, starting from a rotating method each round, so drift in the
machine's speed hits every method alike. Each step of each method is timed
with the ranks in step (a barrier first), and the bytes it put on the wire are
read from this host's interface counter around it. The link is shaped to the
cell's rate after the warm-up (:func:`shape`), then probed. Correctness comes first:
after the warm-up and at the end every method but the bound must hold
identical parameters on every rank and a finite loss, and ``none`` must match
plain DDP (bit for bit on 2 and 4 ranks); a method that fails is reported as failed, without a
speed. Rank 0 writes one line per round to the progress file.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distcomp.bench import data, netns
from distcomp.bench.methods import Method, Replica, build, model_config
from distcomp.models.gpt import GPT

PROBE_BYTES = 4 * 2**20
"""Size of the all-reduce that measures the link's bandwidth before the steps."""


@dataclass
class Record:
    """What this rank measured for one method (plain values: it travels as JSON)."""

    seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    tx_bytes: list[int] = field(default_factory=list)
    stats: list[dict[str, float]] = field(default_factory=list)
    failure: str = ""
    digest: str = ""


def _tx_bytes(iface: str | None) -> int:
    """Bytes sent so far on ``iface`` (-1 when there is no interface to read)."""
    if not iface:
        return -1
    try:
        return int(Path(f"/sys/class/net/{iface}/statistics/tx_bytes").read_text())
    except OSError:
        return -1


def _step(rep: Replica, x: torch.Tensor, y: torch.Tensor) -> float:
    rep.optimizer.zero_grad(set_to_none=True)
    _, loss = rep.ddp(x, y)
    loss.backward()
    rep.optimizer.step()
    return float(loss.item())


def _timed_step(rep: Replica, rec: Record, x: torch.Tensor, y: torch.Tensor, iface: str | None) -> None:
    dist.barrier()  # every method starts its step with the ranks in step
    tx, start = _tx_bytes(iface), time.perf_counter()
    loss = _step(rep, x, y)
    rec.seconds.append(time.perf_counter() - start)
    rec.tx_bytes.append(_tx_bytes(iface) - tx)
    rec.losses.append(loss)
    rec.stats.append(rep.step_stats())


def probe_all_reduce(nbytes: int, reps: int) -> float:
    """Median seconds of an all-reduce of ``nbytes``."""
    x = torch.ones(max(nbytes // 4, 1))
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def shape(iface: str | None, rate: str | None) -> None:
    """Cap this host's egress at ``rate`` (tc tbf), then wait for every rank to have done the same.

    The cell's link is shaped only now, after the warm-up: its untimed steps include the compressors' exact
    fp32 steps, which would take minutes on a slow link and measure nothing."""
    if rate is not None and iface:
        subprocess.run(["tc", "qdisc", "replace", "dev", iface, "root", *netns.tbf_args(rate)], check=True)
    dist.barrier()


def _health(replicas: Sequence[Replica], records: dict[str, Record]) -> dict[str, str]:
    """``{method: why it is wrong}``, the same on every rank."""
    mine = {
        r.method.name: (data.param_digest(r.model), all(map(math.isfinite, records[r.method.name].losses)))
        for r in replicas
    }
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    out = {}
    for rep in replicas:
        name = rep.method.name
        if not all(h[name][1] for h in everyone):
            out[name] = "non-finite loss"
        elif rep.method.kind != "noop" and len({h[name][0] for h in everyone}) > 1:
            out[name] = "ranks hold different parameters"
        elif name == "none" and "ddp" in mine and not _matches_ddp(replicas, mine):
            out[name] = "parameters differ from plain DDP's"
    return out


def _matches_ddp(replicas: Sequence[Replica], digests: dict[str, tuple[str, bool]]) -> bool:
    """``none`` against plain DDP: bit for bit when the world size is a power of two; otherwise within float
    rounding, because DDP and distcomp divide by the world size at different points of the sum, and only a
    division by a power of two is exact."""
    w = dist.get_world_size()
    if w & (w - 1) == 0:
        return digests["none"][0] == digests["ddp"][0]
    models = {r.method.name: r.model for r in replicas}
    pairs = zip(models["none"].parameters(), models["ddp"].parameters())
    return all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in pairs)


def _mark(records: dict[str, Record], verdicts: dict[str, str], when: str) -> None:
    for name, why in verdicts.items():
        if not records[name].failure:
            records[name].failure = f"{when}: {why}"


def run(job: dict[str, Any]) -> dict[str, Any]:
    """This rank's side of one cell: every method for ``warmup + max(steps, loss_steps)`` rounds."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(job["threads"])
    methods = [Method(**{**m, "options": tuple(tuple(kv) for kv in m["options"])}) for m in job["methods"]]
    corpus, cfg = data.corpus(), model_config(job["model"])
    replicas = []
    for m in methods:
        torch.manual_seed(job["seed"])  # every replica starts from the same weights: no broadcast needed
        replicas.append(build(m, GPT(cfg), lr=job["lr"], bucket_cap_mb=job["bucket_cap_mb"]))
    records = {m.name: Record() for m in methods}
    iface = os.environ.get("GLOO_SOCKET_IFNAME")
    rounds = job["warmup"] + max(job["steps"], job["loss_steps"])
    progress = Path(job["progress"]) if rank == 0 else None
    probe: dict[str, float] = {}
    for step in range(rounds):
        if step == job["warmup"]:
            _mark(records, _health(replicas, records), "after warm-up")
            shape(iface, job["rate"])
            probe = {"small_s": probe_all_reduce(4, 20), "large_s": probe_all_reduce(PROBE_BYTES, 3)}
            probe["large_bytes"] = PROBE_BYTES
        x, y = data.batch(corpus, rank, step, job["global_batch"] // world, cfg.context)
        for j in range(len(replicas)):
            rep = replicas[(step + j) % len(replicas)]
            if not records[rep.method.name].failure:
                _timed_step(rep, records[rep.method.name], x, y, iface)
        if progress is not None:
            with progress.open("a") as f:
                f.write(f"{step + 1} {rounds}\n")
    _mark(records, _health(replicas, records), "at the end")
    for rep in replicas:
        records[rep.method.name].digest = data.param_digest(rep.model)
        rep.close()
    numel = sum(p.numel() for p in replicas[0].model.parameters())
    blocks = sum(p.numel() for p in GPT(cfg).blocks.parameters())
    return {
        "rank": rank,
        "world": world,
        "numel": numel,
        "root_numel": numel - blocks,
        "probe": probe,
        "records": {k: asdict(v) for k, v in records.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Join the group torchrun set up, run the job, write ``rank<R>.json`` beside the job file."""
    argv = sys.argv[1:] if argv is None else list(argv)
    path = Path(argv[0])
    job = json.loads(path.read_text())
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=job["collective_timeout_s"]))
    try:
        out = run(job)
        dist.barrier()  # exiting right after DDP can abort the process
    finally:
        dist.destroy_process_group()
    (path.parent / f"rank{out['rank']}.json").write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
