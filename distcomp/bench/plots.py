"""The PNG plots of a ``distcomp bench`` run (matplotlib, an optional dependency: ``distcomp[bench]``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distcomp.bench.report import TTL_LINKS, link_bits, smoothed
from distcomp.bench.run import CellResult
from distcomp.bench.validate import Point


def available() -> str | None:
    """Why plots cannot be drawn (None when they can)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed: pip install 'distcomp[bench]' to get the plots"
    return None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _host_counts(cells: Sequence[CellResult]) -> list[int]:
    return sorted({c.hosts for c in cells})


def step_vs_bandwidth(cells: Sequence[CellResult], methods: Sequence[str], path: Path) -> None:
    """Median step time against link rate, one line per method, one panel per host count."""
    plt = _pyplot()
    counts = _host_counts(cells)
    fig, axes = plt.subplots(1, len(counts), figsize=(6 * len(counts), 4.5), squeeze=False, sharey=True)
    for ax, hosts in zip(axes[0], counts):
        mine = sorted((c for c in cells if c.hosts == hosts), key=link_bits)
        for name in methods:
            xs = [link_bits(c) / 1e6 for c in mine if _ok(c, name)]
            ys = [c.methods[name].step_s * 1e3 for c in mine if _ok(c, name)]  # type: ignore[operator]
            if xs:
                ax.plot(xs, ys, marker="o", label=name, linestyle="--" if name in ("ddp", "noop") else "-")
        ax.set(xscale="log", yscale="log", title=f"{hosts} hosts", xlabel="link, Mbit/s (unshaped: as probed)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("median step, ms")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ok(cell: CellResult, name: str) -> bool:
    f = cell.methods.get(name)
    return f is not None and not f.failure and f.step_s is not None


def loss_vs_time(cells: Sequence[CellResult], loss_cells: dict[int, CellResult], path: Path) -> None:
    """Smoothed loss against wall-clock at each of :data:`TTL_LINKS` (every link when the run has neither):
    step ``i`` ends at ``i`` times the median step measured on that link."""
    plt = _pyplot()
    links = TTL_LINKS if any(c.link in TTL_LINKS for c in cells) else tuple(c.link for c in cells)
    panels = [(h, c) for h in _host_counts(cells) for c in cells if c.hosts == h and c.link in links]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (hosts, cell) in zip(axes[0], panels):
        curves = loss_cells[hosts].methods
        for name, f in cell.methods.items():
            losses = curves[name].losses if name in curves else []
            if name == "noop" or not losses or not _ok(cell, name):
                continue
            t = [(i + 1) * f.step_s for i in range(len(losses))]  # type: ignore[operator]
            ax.plot(t, smoothed(losses), label=name, linestyle="--" if name == "ddp" else "-")
        ax.set(title=f"{hosts} hosts, {cell.link}", xlabel="wall-clock, s", ylabel="training loss (5-step mean)")
        ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bytes_per_step(cells: Sequence[CellResult], path: Path) -> None:
    """MB each host sent per step, from its interface counter and from distcomp's telemetry."""
    plt = _pyplot()
    counts = _host_counts(cells)
    fig, axes = plt.subplots(1, len(counts), figsize=(7 * len(counts), 4.5), squeeze=False)
    for ax, hosts in zip(axes[0], counts):
        cell = min((c for c in cells if c.hosts == hosts), key=link_bits)  # the slowest link of these hosts
        names = [n for n, f in cell.methods.items() if not f.failure and f.tx_mb is not None]
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [cell.methods[n].tx_mb for n in names], 0.4, label="interface counter")
        stats = [cell.methods[n].stats_mb or 0.0 for n in names]
        ax.bar([x + 0.2 for x in xs], stats, 0.4, label="stats() (distcomp methods)")
        ax.set_xticks(list(xs), names, rotation=45, ha="right", fontsize=8)
        ax.set(yscale="log", ylabel="MB sent per step per host", title=f"{hosts} hosts, {cell.link}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def predicted_vs_measured(pts: Sequence[Point], path: Path, limit: float = 0.25) -> None:
    """Every point's predicted step against its measured one, with the +-``limit`` band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for link in dict.fromkeys(p.link for p in pts):
        mine = [p for p in pts if p.link == link]
        ax.scatter([p.measured_s * 1e3 for p in mine], [p.predicted_s * 1e3 for p in mine], label=link, s=18)
    lo = min(min(p.measured_s, p.predicted_s) for p in pts) * 1e3 * 0.8
    hi = max(max(p.measured_s, p.predicted_s) for p in pts) * 1e3 * 1.25
    ax.plot([lo, hi], [lo, hi], color="k", linewidth=0.8)
    ax.fill_between([lo, hi], [lo * (1 - limit), hi * (1 - limit)], [lo * (1 + limit), hi * (1 + limit)], alpha=0.15)
    ax.set(xscale="log", yscale="log", xlabel="measured step, ms", ylabel="predicted step, ms")
    ax.set_title(f"distcomp bench predict: every measured point (band: +-{limit:.0%})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
