"""The summary's predicted rows: what each compared run's step would take with every rank on its own host at
100 Mbit/s, 1 Gbit/s and 10 Gbit/s (:mod:`distcomp.bench.predict`), because a job over loopback, where
compression cannot pay, shows about the same step time with and without it."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from distcomp.bench import reference
from distcomp.bench.predict import OPTIMIZER_EXCHANGE, Network, Workload, step_time
from distcomp.bench.traffic import Traffic, compressed_traffic
from distcomp.models.gpt import GPT
from distcomp.train.config import RunSpec, TrainConfig
from distcomp.train.telemetry import RunResult

logger = logging.getLogger("distcomp")

LINKS = (("100 Mbit/s", 100e6), ("1 Gbit/s", 1e9), ("10 Gbit/s", 10e9))
DDP_BUCKET_CAP_MB = 25.0
"""DDP's default bucket size, which ``distcomp train`` keeps."""


def _traffic(spec: RunSpec, shapes: list[tuple[int, ...]], world: int, device: str) -> Traffic:
    compressor = spec.compression if spec.compression is not None else OPTIMIZER_EXCHANGE
    return compressed_traffic(compressor, {}, shapes, world, bucket_cap_mb=DDP_BUCKET_CAP_MB, device=device, reps=2)


def predicted_rows(
    cfg: TrainConfig, results: Sequence[RunResult], world: int, device: str
) -> list[tuple[str, list[str]]]:
    """``(label, one cell per run)`` for each link: predicted ms per step and speedup over the ``none`` run."""
    if world < 2 or not results:
        return []
    specs = {s.name: s for s in cfg.runs()}
    shapes = [tuple(p.shape) for p in GPT(cfg.model).parameters()]
    base = next((r for r in results if r.compressor == "none"), None)
    # The compute of a step: the uncompressed run's step over loopback, where the wire costs little.
    compute = (base.step_ms if base else min(r.step_ms for r in results)) / 1e3
    wl = Workload(shapes=tuple(shapes), compute_s=compute, bucket_cap_mb=DDP_BUCKET_CAP_MB, device=device)
    traffic = {r.compressor: _traffic(specs[r.compressor], shapes, world, device) for r in results}
    rows = []
    for label, bits in LINKS:
        net = Network(bandwidth_bits=bits)
        steps = {name: step_time(name, t, wl, net, world).step_s for name, t in traffic.items()}
        ref = steps.get("none")
        cells = [f"{steps[r.compressor] * 1e3:.0f} ms" + _speedup(ref, steps[r.compressor]) for r in results]
        rows.append((f"predicted at {label}", cells))
    return rows


def _speedup(ref: float | None, step: float) -> str:
    return f" ({ref / step:.1f}x)" if ref and math.isfinite(ref) and step else ""


def footnote(world: int) -> str:
    """What the predicted rows are and how far the predictor was from the committed benchmark run."""
    return (
        f"predicted: not measured here; {world} ranks, each on its own host with that link (distcomp bench "
        f"predict: alpha-beta model, this model's payload, codec timed here). {reference.validation_line()}"
    )


def safe_rows(cfg: TrainConfig, results: Sequence[RunResult], world: int, device: str) -> list[tuple[str, list[str]]]:
    """:func:`predicted_rows`, or none with a warning: a prediction never costs the job its summary."""
    try:
        return predicted_rows(cfg, results, world, device)
    except Exception as exc:  # the summary must be written whatever the predictor does
        logger.warning("no predicted rows in the summary: %s", exc)
        return []
