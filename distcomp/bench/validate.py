"""The predictor against every measured point of a ``distcomp bench`` run: its error and its ranking.

Each cell is predicted from what a user could know or measure: the step's compute (the cell's
no-communication bound), the link (the cell's 4 MB all-reduce probe for the bandwidth, its one-element
all-reduce for the latency), and each method's payload and codec cost from a dry run on this machine.
Where more ranks than cores share the machine, the codec time is scaled by ranks per core.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distcomp.bench import netns
from distcomp.bench.methods import Method
from distcomp.bench.predict import Network, Workload, method_traffic, step_time
from distcomp.bench.report import fmt, probed_bits, table
from distcomp.bench.run import CellResult
from distcomp.bench.traffic import Shape, Traffic

RANK_TOLERANCE = 0.05
"""Two methods whose measured steps differ by less than this (or than their spread) count as tied."""


@dataclass(frozen=True)
class Point:
    """One method in one cell: measured against predicted."""

    hosts: int
    link: str
    method: str
    measured_s: float
    predicted_s: float
    spread: float
    nominal_s: float | None = None
    """Predicted from the link's nominal rate at :data:`~distcomp.bench.predict.GOODPUT` (what a user types)
    instead of the probe; None for an unshaped link, which has no nominal rate."""

    @property
    def error(self) -> float:
        return self.predicted_s / self.measured_s - 1

    @property
    def nominal_error(self) -> float | None:
        return None if self.nominal_s is None else self.nominal_s / self.measured_s - 1


def cell_network(cell: CellResult) -> Network:
    """The link as the cell's probes measured it."""
    p = cell.hosts
    return Network(bandwidth_bits=probed_bits(cell), latency_s=cell.probe["small_s"] / (2 * (p - 1)), efficiency=1.0)


def points(
    cells: Sequence[CellResult], methods: Sequence[Method], shapes: Sequence[Shape], bucket_cap_mb: float
) -> list[Point]:
    """Every method of every cell that passed its checks, with its prediction."""
    cores = len(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank ran
    traffic: dict[tuple[str, int], Traffic | None] = {}
    out = []
    try:
        for cell in cells:
            net = cell_network(cell)
            for m in methods:
                f = cell.methods.get(m.name)
                if f is None or f.failure or f.step_s is None or f.bound_s is None:
                    continue
                wl = Workload(
                    shapes=tuple(shapes),
                    compute_s=f.bound_s,  # the bound of the method's own job
                    bucket_cap_mb=bucket_cap_mb,
                    codec_scale=max(1.0, cell.hosts / cores),
                )
                key = (m.name, cell.hosts)
                if key not in traffic:
                    traffic[key] = method_traffic(m, wl, cell.hosts)
                pred = step_time(m.name, traffic[key], wl, net, cell.hosts)
                nominal = None
                if cell.rate is not None:
                    typed = Network(bandwidth_bits=netns.rate_bits(cell.rate), latency_s=net.latency_s)
                    nominal = step_time(m.name, traffic[key], wl, typed, cell.hosts).step_s
                out.append(Point(cell.hosts, cell.link, m.name, f.step_s, pred.step_s, f.spread or 0.0, nominal))
    finally:
        torch.set_num_threads(threads)
    return out


def misranked(pts: Sequence[Point]) -> list[tuple[Point, Point]]:
    """Pairs in one cell that the measurement orders clearly and the prediction orders the other way."""
    out = []
    for i, a in enumerate(pts):
        for b in pts[i + 1 :]:
            if (a.hosts, a.link) != (b.hosts, b.link):
                continue
            gap = abs(a.measured_s / b.measured_s - 1)
            if gap <= max(RANK_TOLERANCE, a.spread, b.spread):
                continue
            if (a.measured_s < b.measured_s) != (a.predicted_s < b.predicted_s):
                out.append((a, b))
    return out


def error_table(pts: Sequence[Point]) -> str:
    """Measured and predicted step of every point, with the error."""
    rows = [
        [
            str(p.hosts),
            p.link,
            p.method,
            f"{p.measured_s * 1e3:.0f}",
            f"{p.predicted_s * 1e3:.0f}",
            f"{p.error * 100:+.0f}%",
            fmt(p.nominal_s * 1e3 if p.nominal_s else None, ".0f"),
            fmt(p.nominal_error * 100 if p.nominal_error is not None else None, "+.0f")
            + "%" * (p.nominal_s is not None),
        ]
        for p in pts
    ]
    cols = ["hosts", "link", "method", "measured ms", "predicted ms", "error", "from nominal rate ms", "error"]
    return table(cols, rows)


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.0f}%"


def summary(pts: Sequence[Point], limit: float = 0.25) -> list[str]:
    """Largest and median error, points outside ``limit``, and the ranking."""
    if not pts:
        return ["- no point to compare"]
    errs = sorted(abs(p.error) for p in pts)
    outside = [p for p in pts if abs(p.error) > limit]
    wrong = misranked(pts)
    typed = sorted(abs(e) for p in pts if (e := p.nominal_error) is not None)
    lines = [
        f"- {len(pts)} points; median |error| {fmt(errs[len(errs) // 2] * 100, '.0f')}%, "
        f"largest {errs[-1] * 100:.0f}%; within {limit:.0%}: {len(pts) - len(outside)} of {len(pts)}",
        f"- from the nominal rate (shaped links, {len(typed)} points): median |error| "
        f"{fmt(typed[len(typed) // 2] * 100 if typed else None, '.0f')}%, largest "
        f"{fmt(typed[-1] * 100 if typed else None, '.0f')}%; within {limit:.0%}: {sum(e <= limit for e in typed)}",
        f"- ranking: {len(wrong)} clearly ordered pair(s) predicted the other way",
    ]
    lines += [f"  - outside {limit:.0%}: {p.hosts} hosts, {p.link}, {p.method}: {p.error * 100:+.0f}%" for p in outside]
    lines += [
        f"  - misranked: {a.hosts} hosts, {a.link}: {a.method} vs {b.method} (measured {a.measured_s * 1e3:.0f} vs "
        f"{b.measured_s * 1e3:.0f} ms, predicted {a.predicted_s * 1e3:.0f} vs {b.predicted_s * 1e3:.0f})"
        for a, b in wrong
    ]
    return lines
