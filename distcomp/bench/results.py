"""Run the planned cells with a progress bar, then write the results folder: ``results.json``, ``README.md``
with every table, and the plots. ``distcomp bench --report FOLDER`` writes the tables and plots again from
a folder's ``results.json``."""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from distcomp.bench import netns, plots, report, validate
from distcomp.bench.methods import Method, model_config
from distcomp.bench.run import Cell, CellConfig, CellResult, MethodFigures, read_cell, run_cell

logger = logging.getLogger("distcomp.bench")


def results_root() -> Path:
    """``benchmarks/results`` of the checkout this runs in (or below the current folder), else ``./distcomp-bench``."""
    for base in (Path.cwd(), *Path.cwd().parents):
        if (base / "benchmarks" / "results").is_dir():
            return base / "benchmarks" / "results"
    return Path.cwd() / "distcomp-bench"


def free_folder(parent: Path, stem: str) -> Path:
    """``parent/stem``, or ``stem-2``, ``stem-3``... when taken: a run never writes into another's folder."""
    candidate, n = parent / stem, 1
    while candidate.exists():
        n += 1
        candidate = parent / f"{stem}-{n}"
    return candidate


BYTES_PER_PARAMETER = 40
"""Resident bytes per parameter of one replica in a rank (weights, gradients, DDP's buckets, AdamW's moments,
residuals, workspaces): 17 replicas of the 10.9M GPT held 6.8 GB per rank (37 bytes per parameter)."""
RANK_BASE_BYTES = 500e6
"""Resident bytes of a rank before its replicas (torch, gloo, the corpus)."""
BASELINES = ("ddp", "noop")


def replicas_per_job(hosts: int, numel: int, available: float | None = None) -> int:
    """How many replicas each of ``hosts`` ranks may hold on this machine: 70% of the available memory."""
    available = _available_bytes() if available is None else available
    per_rank = 0.7 * available / hosts - RANK_BASE_BYTES
    return max(len(BASELINES) + 1, int(per_rank // (BYTES_PER_PARAMETER * numel)))


def _available_bytes() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 16e9


def _weight(m: Method) -> float:
    # An FSDP replica holds a shard of the weights, gradients and moments (plus transient all-gathers).
    return 0.5 if m.kind == "fsdp" else 1.0


def _groups(methods: Sequence[Method], size: int) -> list[tuple[Method, ...]]:
    """The methods in jobs of at most ``size`` replicas' memory, filled in table order, each job with the
    baselines (its ratios' reference)."""
    base = [m for m in methods if m.name in BASELINES]
    room = max(size - len(base), 1)
    groups: list[list[Method]] = [[]]
    for m in (m for m in methods if m.name not in BASELINES):
        if groups[-1] and sum(map(_weight, groups[-1])) + _weight(m) > room:
            groups.append([])
        groups[-1].append(m)
    return [tuple(base + g) for g in groups]


def plan_cells(
    hosts: Sequence[int],
    links: Sequence[str | None],
    methods: Sequence[Method],
    loss_steps: int,
    dense: bool,
    numel: int = 0,
    available: float | None = None,
) -> list[Cell]:
    """Every (hosts, link) cell; the fastest link of each host count also records the loss curve (1.5 N steps
    after the warm-up); links slower than 50 Mbit/s leave out the dense methods unless ``dense``. A cell whose
    replicas would not fit in memory is split into jobs, each with its own baselines."""
    fastest = min(links, key=lambda r: -math.inf if r is None else -netns.rate_bits(r))
    cells = []
    for h in hosts:
        size = replicas_per_job(h, numel, available) if numel else len(methods)
        for link in links:
            slow = link is not None and netns.rate_bits(link) < netns.SLOW_LINK_BITS and not dense
            chosen = [m for m in methods if not (slow and m.dense)]
            loss = math.ceil(1.5 * loss_steps) if link == fastest else 0
            cells += [Cell(h, link, g, loss, i) for i, g in enumerate(_groups(chosen, size))]
    return cells


def merge(parts: Sequence[CellResult]) -> CellResult:
    """The jobs of one (hosts, link) pair as one cell: every method once (the baselines from the first job;
    each method keeps the baselines of its own job in ``bound_s`` and ``ddp_s``)."""
    first = parts[0]
    methods: dict[str, MethodFigures] = {}
    for part in parts:
        for name, fig in part.methods.items():
            methods.setdefault(name, fig)
    return CellResult(first.hosts, first.rate, sum(p.seconds for p in parts), first.probe, first.numel, methods)


def execute(
    folder: Path,
    hosts: Sequence[int],
    links: Sequence[str | None],
    methods: Sequence[Method],
    steps: int,
    loss_steps: int,
    *,
    dense: bool,
    command: str,
    model: str = "gpt",
) -> list[CellResult]:
    """Run every cell (results saved after each), then write the report."""
    from tqdm import tqdm

    from distcomp.models.gpt import GPT

    folder.mkdir(parents=True)
    cfg = CellConfig(steps=steps, loss_steps=loss_steps, model=model)
    numel = sum(p.numel() for p in GPT(model_config(model)).parameters())
    cells = plan_cells(hosts, links, methods, loss_steps, dense, numel)
    meta = _meta(command, cfg, [m.name for m in methods])
    parts: dict[tuple[int, str | None], list[CellResult]] = {}
    total = sum(cfg.warmup + max(steps, c.loss_steps) for c in cells)
    start = time.monotonic()
    with tqdm(total=total, unit="round", dynamic_ncols=True) as bar:
        for cell in cells:
            bar.set_description(f"{cell.name} ({len(cell.methods)} methods)")
            result = run_cell(cell, cfg, folder / "cells" / cell.name, bar.update)
            parts.setdefault((cell.hosts, cell.rate), []).append(result)
            meta["seconds"] = time.monotonic() - start
            save(folder, meta, [merge(p) for p in parts.values()])
    results = [merge(p) for p in parts.values()]
    write_report(folder, meta, results, methods)
    return results


def _meta(command: str, cfg: CellConfig, names: list[str]) -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout
    except OSError:
        commit = ""
    import torch

    return {
        "command": command,
        "date": f"{datetime.date.today():%Y-%m-%d}",
        "commit": commit.strip(),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPUs; Python {platform.python_version()}; "
        f"torch {torch.__version__}",
        "cores": len(os.sched_getaffinity(0)),
        "config": asdict(cfg),
        "methods": names,
    }


def save(folder: Path, meta: dict[str, Any], results: Sequence[CellResult]) -> None:
    (folder / "results.json").write_text(json.dumps({"meta": meta, "cells": [asdict(r) for r in results]}, indent=1))


def load(folder: Path) -> tuple[dict[str, Any], list[CellResult]]:
    """What :func:`save` wrote."""
    doc = json.loads((folder / "results.json").read_text())
    cells = []
    for c in doc["cells"]:
        figures = {k: MethodFigures(**v) for k, v in c["methods"].items()}
        cells.append(CellResult(**{**c, "methods": figures}))
    return doc["meta"], cells


# -- the report -------------------------------------------------------------------------------


def write_report(folder: Path, meta: dict[str, Any], cells: Sequence[CellResult], methods: Sequence[Method]) -> None:
    """``README.md`` and the plots of a finished run."""
    from distcomp.models.gpt import GPT

    cfg = CellConfig(**meta["config"])
    shapes = [tuple(p.shape) for p in GPT(model_config(cfg.model)).parameters()]
    pts = validate.points(cells, methods, shapes, cfg.bucket_cap_mb)
    names = [m.name for m in methods]
    n = cfg.loss_steps
    ttl_md, ttl = {}, {}
    for h in sorted({c.hosts for c in cells}):
        ttl_md[h], ttl[h] = report.ttl_table(cells, h, n)
    sections = [
        f"# distcomp bench ({meta['date']})",
        f"`{meta['command']}`",
        f"{meta['machine']}; commit {meta['commit'] or 'unknown'}; {meta.get('seconds', 0) / 60:.0f} min",
        _setup(cells, cfg),
    ]
    for h in sorted({c.hosts for c in cells}):
        sections += [
            f"## {h} hosts: median step (ms) and ratio to the no-communication bound",
            report.step_table(cells, h, names),
        ]
    sections += ["## Targets", "\n".join(report.targets(cells, ttl)) or "- (no cell for any target)"]
    for h, md in ttl_md.items():
        ddp = report.reach(cells, h, n).get("ddp")
        target = ddp.target if ddp else None
        sections += [
            f"## Time-to-loss, {h} hosts",
            f"Target: plain DDP's training loss at step {n} ({report.fmt(target, '.3f')}, {report.SMOOTH}-step "
            "trailing mean). Steps come from the loss curves of the fastest link (every method sees the same "
            "batches); seconds are those steps times the median step measured on each link.",
            md,
        ]
    sections += ["## Prediction against measurement", validate.__doc__.split("\n\n")[1].replace("\n", " ")]
    sections += ["\n".join(validate.summary(pts)), validate.error_table(pts)]
    for c in cells:
        sections += [
            f"## {c.hosts} hosts, {c.link}",
            f"probe: 4 MB all-reduce {c.probe['large_s'] * 1e3:.1f} ms ({report.probed_bits(c) / 1e9:.3f} Gbit/s per "
            f"host), one-element all-reduce {c.probe['small_s'] * 1e6:.0f} us; cell took {c.seconds:.0f} s",
            report.cell_table(c, cfg.global_batch),
        ]
    sections.append(_draw(folder, cells, pts, names))
    (folder / "README.md").write_text("\n\n".join(sections) + "\n")
    (folder / "validation.json").write_text(json.dumps([asdict(p) | {"error": p.error} for p in pts], indent=1))


def _setup(cells: Sequence[CellResult], cfg: CellConfig) -> str:
    numel = cells[0].numel if cells else 0
    return (
        f"Byte-level GPT, {numel / 1e6:.2g}M parameters; global batch {cfg.global_batch} sequences of "
        f"{model_config(cfg.model).context} tokens "
        f"(split over the hosts); AdamW lr {cfg.lr}; DDP buckets {cfg.bucket_cap_mb:g} MB (torch's powerSGD_hook: "
        f"one bucket); {cfg.warmup} warm-up steps, then at least {cfg.steps} timed steps per method. Each host is a "
        "network namespace on one bridge, its egress shaped with tc tbf; one rank per host, gloo, one thread; "
        "started by `distcomp launch --hostfile` over ssh. Step time: median over timed steps of the slowest rank; "
        "IQR: interquartile range over the median. Bytes: this host's interface counter (IP headers included) and "
        "distcomp's `stats()` (bandwidth-optimal count of each collective), plus what the wrapper sends on its "
        "own: for ddp a ring all-reduce of the fp32 gradients, for the fsdp rows two fp32 all-gathers of the "
        "parameters (and plain fsdp's reduce-scatter)."
    )


def _draw(folder: Path, cells: Sequence[CellResult], pts: Sequence[validate.Point], names: list[str]) -> str:
    why = plots.available()
    if why is not None:
        return f"(no plots: {why})"
    plots.step_vs_bandwidth(cells, names, folder / "step_vs_bandwidth.png")
    losses = {h: c for h in {c.hosts for c in cells} if (c := report.loss_cell(cells, h)) is not None}
    plots.loss_vs_time(cells, losses, folder / "loss_vs_time.png")
    plots.bytes_per_step(cells, folder / "bytes_per_step.png")
    if pts:
        plots.predicted_vs_measured(pts, folder / "predicted_vs_measured.png")
    files = ["step_vs_bandwidth", "loss_vs_time", "bytes_per_step", "predicted_vs_measured"]
    return "## Plots\n\n" + "\n\n".join(f"![{f}]({f}.png)" for f in files if (folder / f"{f}.png").exists())


def rewrite(folder: Path) -> None:
    """The figures, report and plots again from the ranks' records in ``folder/cells`` (e.g. after a change
    to the predictor or to how figures are derived); ``results.json`` is rewritten with them."""
    from distcomp.bench.methods import select

    meta, old = load(folder)
    cfg = CellConfig(**meta["config"])
    seconds = {(c.hosts, c.rate): c.seconds for c in old}
    parts: dict[tuple[int, str | None], list[CellResult]] = {}
    for cell_dir in sorted((folder / "cells").iterdir(), key=lambda p: (len(p.name), p.name)):
        if (cell_dir / "rank0.json").exists():
            hosts = len((cell_dir / "hosts").read_text().splitlines())
            rate = json.loads((cell_dir / "job.json").read_text())["rate"]
            parts.setdefault((hosts, rate), []).append(read_cell(cell_dir, hosts, rate, cfg, 0.0))
    cells = []
    for key, found in parts.items():
        merged = merge(found)
        merged.seconds = seconds.get(key, 0.0)
        cells.append(merged)
    order = {(c.hosts, c.rate): i for i, c in enumerate(old)}
    cells.sort(key=lambda c: order.get((c.hosts, c.rate), len(order)))
    save(folder, meta, cells)
    write_report(folder, meta, cells, select(meta["methods"], cfg.warmup))


def set_reference(folder: Path) -> None:
    """Ship ``folder``'s time-to-loss factors and prediction errors with the package (:mod:`reference`)."""
    from distcomp.bench import reference

    meta, cells = load(folder)
    n = CellConfig(**meta["config"]).loss_steps
    reached = report.reach(cells, max(c.hosts for c in cells), n)
    # A method that never reached the target ships at the lower bound of its factor.
    factors = {k: (r.steps or r.recorded) / n for k, r in reached.items()}
    errors = [p["error"] for p in json.loads((folder / "validation.json").read_text())]
    links = list(dict.fromkeys(c.link for c in cells))
    root = results_root().parent.parent
    run = str(folder.resolve().relative_to(root)) if folder.resolve().is_relative_to(root) else folder.name
    reference.write(run, links, factors, errors)
