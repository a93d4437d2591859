"""What a ``distcomp bench`` run measured, as tables: step time per method, host count and link; bytes
from the interfaces' counters against distcomp's telemetry; time-to-loss; the targets; and the predictor's
error against every measured point."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from distcomp.bench import netns
from distcomp.bench.run import SMOOTH, CellResult, MethodFigures

TTL_LINKS = ("100mbit", "1gbit")
"""The links time-to-loss is reported at."""


def fmt(x: float | None, spec: str) -> str:
    """``x`` formatted by ``spec``; ``-`` for a figure that does not apply."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def link_bits(cell: CellResult) -> float:
    """The link's rate in bits/s; for an unshaped link, what the cell's probe measured."""
    if cell.rate is not None:
        return netns.rate_bits(cell.rate)
    return probed_bits(cell)


def probed_bits(cell: CellResult) -> float:
    """Goodput per host of the cell's 4 MB all-reduce, in bits/s (ring: each host sends 2 (p-1)/p of it)."""
    p = cell.hosts
    return 2 * (p - 1) / p * cell.probe["large_bytes"] * 8 / cell.probe["large_s"]


# -- step times -------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def x_bound(f: MethodFigures) -> float | None:
    """``f``'s step over the no-communication bound of its own job."""
    return _ratio(f.step_s, f.bound_s)


def x_ddp(f: MethodFigures) -> float | None:
    """``f``'s step over plain DDP's in its own job."""
    return _ratio(f.step_s, f.ddp_s)


def step_table(cells: Sequence[CellResult], hosts: int, methods: Sequence[str]) -> str:
    """Median step (ms) and its ratio to the no-communication bound, one column per link."""
    mine = [c for c in cells if c.hosts == hosts]
    rows = []
    for name in methods:
        row = [name]
        for c in mine:
            f = c.methods.get(name)
            if f is None:
                row.append("-")
            elif f.failure:
                row.append(f"failed: {f.failure}")
            else:
                row.append(f"{fmt(f.step_s * 1e3 if f.step_s else None, '.0f')} ({fmt(x_bound(f), '.2f')}x)")
        rows.append(row)
    return table(["method", *[f"{c.link} ms (x bound)" for c in mine]], rows)


def cell_table(cell: CellResult, context_tokens: int) -> str:
    """Every figure of one cell."""
    rows = []
    for f in cell.methods.values():
        if f.failure:
            rows.append([f.name, f"failed: {f.failure}", *["-"] * 9])
            continue
        rows.append(
            [
                f.name,
                fmt(f.step_s * 1e3 if f.step_s else None, ".0f"),
                fmt(f.spread * 100 if f.spread is not None else None, ".0f"),
                fmt(x_bound(f), ".2f"),
                fmt(x_ddp(f), ".2f"),
                fmt(f.tokens_s, ".0f"),
                fmt(f.tx_mb, ".2f"),
                fmt(f.stats_mb, ".2f"),
                fmt(_ratio(f.tx_mb, f.stats_mb), ".3f"),
                fmt(f.codec_s * 1e3 if f.codec_s is not None else None, ".0f"),
                fmt(f.exposed_s * 1e3 if f.exposed_s is not None else None, ".0f"),
            ]
        )
    cols = ["method", "ms/step", "IQR %", "x bound", "x DDP", "tokens/s", "MB sent (counter)", "MB sent (stats)"]
    return table(cols + ["counter/stats", "codec ms", "exposed ms"], rows)


# -- time-to-loss -----------------------------------------------------------------------------


def smoothed(losses: Sequence[float], window: int = SMOOTH) -> list[float]:
    """Trailing mean over ``window`` steps."""
    return [statistics.fmean(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]


@dataclass(frozen=True)
class TimeToLoss:
    """Steps and seconds one method needs to reach plain DDP's (smoothed) loss at step N."""

    method: str
    steps: int | None
    """None: not reached within the recorded steps."""
    target: float
    recorded: int
    """Steps of the method's loss curve."""


def steps_to_loss(curves: dict[str, list[float]], n: int) -> dict[str, TimeToLoss]:
    """Per method, the first step whose smoothed loss is at most DDP's smoothed loss at step ``n``."""
    target = smoothed(curves["ddp"])[n - 1]
    out = {}
    for name, losses in curves.items():
        s = smoothed(losses)
        reached = next((i + 1 for i, v in enumerate(s) if v <= target), None)
        out[name] = TimeToLoss(name, reached, target, len(losses))
    return out


def reach(cells: Sequence[CellResult], hosts: int, n: int) -> dict[str, TimeToLoss]:
    """:func:`steps_to_loss` of every method but the bound on the loss curves of ``hosts``; empty without a
    loss curve of plain DDP."""
    source = loss_cell(cells, hosts)
    if source is None or "ddp" not in source.methods:
        return {}
    return steps_to_loss({k: f.losses for k, f in source.methods.items() if not f.failure and k != "noop"}, n)


def loss_cell(cells: Sequence[CellResult], hosts: int) -> CellResult | None:
    """The cell of ``hosts`` with the longest loss curves."""
    mine = [c for c in cells if c.hosts == hosts]
    return max(mine, key=lambda c: max(len(f.losses) for f in c.methods.values()), default=None)


def ttl_table(cells: Sequence[CellResult], hosts: int, n: int) -> tuple[str, dict[str, dict[str, float | None]]]:
    """Time-to-loss at :data:`TTL_LINKS`: steps to DDP's loss at step ``n`` times the median step measured on
    that link. Also ``{link: {method: seconds}}``."""
    reached = reach(cells, hosts, n)
    if not reached:
        return "(no loss curve with plain DDP)", {}
    links = [c for c in cells if c.hosts == hosts and c.link in TTL_LINKS]
    seconds: dict[str, dict[str, float | None]] = {}
    rows = []
    ddp_steps = reached["ddp"].steps
    for name, r in reached.items():
        row = [name, str(r.steps) if r.steps else f"> {r.recorded}"]
        for c in links:
            f = c.methods.get(name)
            t = r.steps * f.step_s if r.steps and f and f.step_s else None
            seconds.setdefault(c.link, {})[name] = t
            # Against DDP's time-to-loss with DDP's step from the same job.
            ddp = ddp_steps * f.ddp_s if f and f.ddp_s and ddp_steps else None
            row += [fmt(t, ".1f"), fmt(_ratio(t, ddp), ".2f")]
        rows.append(row)
    cols = ["method", f"steps to DDP's loss at step {n}"]
    for c in links:
        cols += [f"{c.link}: s", f"{c.link}: x DDP"]
    return table(cols, rows), seconds


def best_compressed(cell: CellResult) -> MethodFigures | None:
    """The fastest method that sends less than DDP (not the bound, not DDP, not an uncompressed hook)."""
    skip = {"noop", "ddp", "none"}
    ok = [f for f in cell.methods.values() if f.name not in skip and not f.failure and x_bound(f)]
    return min(ok, key=lambda f: x_bound(f) or math.inf, default=None)


# -- targets ----------------------------------------------------------------------------------


TTLSeconds = dict[int, dict[str, dict[str, float | None]]]
"""``{hosts: {link: {method: seconds to the target loss}}}``."""


def targets(cells: Sequence[CellResult], ttl: TTLSeconds) -> list[str]:
    """The documented targets, each with its figure and met / not met. The method recommended at 1 Gbit/s is
    the one with the shortest measured time-to-loss there."""
    lines = []
    for c in cells:
        psgd, tpsgd = c.methods.get("powersgd"), c.methods.get("torch-powersgd")
        if c.link == "100mbit" and psgd and psgd.step_s and psgd.ddp_s:
            x = psgd.ddp_s / psgd.step_s
            what = f"{c.hosts} hosts, 100mbit: PowerSGD rank 4 >= 4x faster per step than DDP"
            lines.append(_target(what, x, x >= 4))
        if c.link == "100mbit" and psgd and tpsgd and x_bound(psgd) and x_bound(tpsgd):
            x = (x_bound(psgd) or 0) / (x_bound(tpsgd) or 1)
            lines.append(_target(f"{c.hosts} hosts, 100mbit: PowerSGD no slower than torch's powerSGD_hook", x, x <= 1))
        best = best_compressed(c)
        limit = {"100mbit": 1.05, "1gbit": 1.05, "10mbit": 1.15}.get(c.link)
        if limit and best:
            x = x_bound(best) or math.inf
            what = f"{c.hosts} hosts, {c.link}: best compressor ({best.name}) within {limit}x of the bound"
            lines.append(_target(what, x, x <= limit))
    for hosts, by_link in ttl.items():
        seconds = {k: v for k, v in by_link.get("1gbit", {}).items() if v is not None}
        if "ddp" not in seconds:
            continue
        fastest = min(seconds, key=lambda k: seconds[k])
        if fastest == "ddp":
            lines.append(
                f"- {hosts} hosts, 1gbit: the shortest time-to-loss is plain DDP's, so no compression is "
                "recommended there (the target applies to a recommended method: none)"
            )
            continue
        what = f"{hosts} hosts, 1gbit: time-to-loss of the recommended method ({fastest}) below DDP's"
        lines.append(_target(what, seconds[fastest] / seconds["ddp"], seconds[fastest] < seconds["ddp"]))
    return lines


def _target(what: str, x: float, met: bool) -> str:
    return f"- {what}: {x:.2f}x -> {'met' if met else 'NOT met'}"
