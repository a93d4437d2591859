"""Numerics the README promises: results invariant to a power-of-two gradient scale,
a skipped (non-finite) step that leaves every bucket's state as it was, and warnings
for settings that compress nothing.

A loss scaler multiplies gradients by ``2^k``; a compressor must then return exactly
``2^k`` times what it returns for the unscaled gradients, for as long as a dense fp32
all-reduce of them stays finite, and its residual norm must stay finite.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import distcomp
from distcomp import Bucket
from distcomp.comm import BucketRecord, Comm
from distcomp.testing import run_ranks
from test_compressors import OPTIONS as LOSSY

# The lossy options of the compressor tests, with blocks of 64 for sign and int8 too.
OPTIONS: dict[str, dict[str, Any]] = {**LOSSY, "sign": {"block": 64}, "int8": {"block": 64}}
# Large enough for several sign/int blocks; PowerSGD batches the two same-shape matrices.
SHAPES = {"a.weight": (40, 30), "b.weight": (40, 30), "c.weight": (24, 50), "bias": (40,), "odd": (13,)}
SCALES = [-100, -60, -20, 20, 60, 100]
# fp16 is the wire format itself: its range (2^-24 .. 65504) bounds what any scale can do.
FP16_SCALES = [-4, 4, 10]
STEPS = 4


def make(name: str, **overrides: Any) -> distcomp.Compressor:
    cfg = distcomp.build_config(name, {**OPTIONS[name], "start_step": 0, **overrides})
    return distcomp.get_compressor(name)(cfg)


def grads(gen: torch.Generator, names: dict[str, tuple[int, ...]] = SHAPES) -> list[tuple[str, torch.Tensor]]:
    # A spread of magnitudes (tiny to large), as real gradients have.
    return [(n, torch.randn(s, generator=gen) * torch.rand(s, generator=gen).mul(8).exp2().div(16))
            for n, s in names.items()]


def reduce(comp: distcomp.Compressor, named: list[tuple[str, torch.Tensor]], step: int, k: int = 0
           ) -> tuple[torch.Tensor, BucketRecord]:
    bucket = Bucket.from_tensors([(n, torch.ldexp(t, torch.tensor(k))) for n, t in named])
    comm = Comm(group=None, record=BucketRecord(index=0, numel=bucket.numel))
    return comp.reduce(bucket, comm, step).clone(), comm.record


def _scaled_runs(name: str, k: int, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor, BucketRecord]]:
    """``(out at scale 1, out at scale 2^k, record at 2^k)`` per step, the same gradients for both compressors."""
    plain, scaled, steps = make(name), make(name), []
    for step in range(STEPS):
        named = grads(gen)
        out, _ = reduce(plain, named, step)
        out_k, rec = reduce(scaled, named, step, k)
        steps.append((out, out_k, rec))
    return steps


@pytest.mark.parametrize("k", SCALES)
@pytest.mark.parametrize("name", [n for n in OPTIONS if n != "fp16"])
def test_result_is_exactly_equivariant_to_a_power_of_two_scale(
    pg1: None, gen: torch.Generator, name: str, k: int
) -> None:
    for step, (out, out_k, rec) in enumerate(_scaled_runs(name, k, gen)):
        assert not rec.nonfinite, f"step {step}: 2^{k} gradients reported non-finite"
        assert torch.equal(out_k, torch.ldexp(out, torch.tensor(k))), f"step {step}: out(2^{k} g) != 2^{k} out(g)"
        assert math.isfinite(rec.residual_norm), f"step {step}: residual_norm {rec.residual_norm}"


@pytest.mark.parametrize("k", FP16_SCALES)
def test_fp16_is_equivariant_within_its_range(pg1: None, gen: torch.Generator, k: int) -> None:
    """Values fp16 rounds to subnormals at one scale and not at the other differ by at most its subnormal step."""
    for out, out_k, rec in _scaled_runs("fp16", k, gen):
        assert not rec.nonfinite
        tol = 2.0 ** (max(k, 0) - 24)
        torch.testing.assert_close(out_k, torch.ldexp(out, torch.tensor(k)), rtol=0, atol=tol)


def test_residual_norm_of_huge_residuals_is_finite(pg1: None, gen: torch.Generator) -> None:
    """Residuals near fp32's largest values: a plain sum of squares overflows, the reported norm must not."""
    comp = make("topk")
    named = [(n, t.mul(2.0**120)) for n, t in grads(gen)]
    _, rec = reduce(comp, named, 0)
    residual = torch.cat([t.reshape(-1) for t in comp.state_dict()["residuals"].values()]).double()
    assert rec.residual_norm == pytest.approx(float(residual.norm()), rel=1e-5)


@pytest.mark.parametrize("name", [n for n in OPTIONS if n != "fp16"])
def test_large_finite_bucket_is_not_reported_non_finite(pg1: None, gen: torch.Generator, name: str) -> None:
    """A million gradients of one sign near 2^108: their sum passes fp32's range, each value is far inside it."""
    named = [("w", torch.rand(1024, 1024, generator=gen).add_(1.0).mul_(2.0**108))]
    out, rec = reduce(make(name), named, 0)
    assert not rec.nonfinite, "a finite bucket was reported non-finite: the loss scaler would skip every step"
    assert bool(torch.isfinite(out).all())


# -- settings that compress nothing ------------------------------------------------------


@pytest.fixture
def distcomp_warnings(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog for the ``distcomp`` logger's warnings, even where the CLI turned its propagation off."""
    logger = logging.getLogger("distcomp")
    attach = not logger.propagate
    if attach:
        logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="distcomp")
    try:
        yield caplog
    finally:
        if attach:
            logger.removeHandler(caplog.handler)


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "distcomp" and r.levelno == logging.WARNING]


def test_powersgd_rank_above_every_matrix_warns_once(pg1: None, gen: torch.Generator, distcomp_warnings) -> None:
    comp = make("powersgd", rank=64)
    for step in range(3):
        out, rec = reduce(comp, grads(gen), step)
    (message,) = _messages(distcomp_warnings)
    assert "rank 64" in message and "none of the 3 matrices" in message and "sent dense" in message, message
    assert rec.payload_bytes <= 4 * out.numel() + 4, "nothing is compressed, but no more than dense is sent"


def test_powersgd_rank_that_sends_more_than_dense_warns(pg1: None, gen: torch.Generator, distcomp_warnings) -> None:
    comp = make("powersgd", rank=8, min_compression_rate=0.0)
    for step in range(2):
        reduce(comp, grads(gen, {"w": (8, 8), "v": (8, 8)}), step)
    (message,) = _messages(distcomp_warnings)
    assert "rank 8 sends 2.00x the values of the dense gradient" in message, message
    assert "min_compression_rate" in message


def test_powersgd_rank_that_compresses_does_not_warn(pg1: None, gen: torch.Generator, distcomp_warnings) -> None:
    comp = make("powersgd", rank=2)
    for step in range(2):
        reduce(comp, grads(gen), step)
    assert _messages(distcomp_warnings) == []


@pytest.mark.parametrize("options, setting", [({"k": 10_000}, "k=10000"), ({"ratio": 1.0}, "ratio=1.0")])
def test_topk_larger_than_a_bucket_allows_averages_exactly_and_warns_once(
    pg1: None, gen: torch.Generator, distcomp_warnings, options: dict[str, Any], setting: str
) -> None:
    """Gathering k values and int32 indices costs twice the dense bytes at k = numel: send the bucket dense instead."""
    comp = make("topk", **options)
    for step in range(3):
        named = grads(gen)
        out, rec = reduce(comp, named, step)
        assert torch.equal(out, torch.cat([t.reshape(-1) for _, t in named])), "one rank: the exact mean is the input"
        assert rec.payload_bytes <= 4 * out.numel(), f"sent {rec.payload_bytes} bytes for {out.numel()} values"
        assert rec.residual_norm == 0.0
    (message,) = _messages(distcomp_warnings)
    assert setting in message and "averaged exactly" in message, message


def test_topk_that_compresses_does_not_warn(pg1: None, gen: torch.Generator, distcomp_warnings) -> None:
    reduce(make("topk", ratio=0.1), grads(gen), 0)
    assert _messages(distcomp_warnings) == []


# -- the same over real ranks -----------------------------------------------------------

RANK_SCALES = [0, -100, 100]
# fp16 cannot hold 2^100 g: out of its range only the non-finite report is promised.
WIDE_RANGE = [n for n in OPTIONS if n != "fp16"]


def _scaled_job(rank: int, world: int) -> dict[str, list[torch.Tensor]]:
    """Every compressor over ``STEPS`` steps at each scale of ``RANK_SCALES``; the outputs by name and scale."""
    out: dict[str, list[torch.Tensor]] = {}
    for name in WIDE_RANGE:
        for k in RANK_SCALES:
            gen, comp = torch.Generator().manual_seed(100 + rank), make(name)
            outs = []
            for step in range(STEPS):
                got, rec = reduce(comp, grads(gen), step, k)
                assert not rec.nonfinite and math.isfinite(rec.residual_norm), (name, k, step)
                outs.append(got)
            out[f"{name}/{k}"] = outs
    return out


@pytest.mark.slow
def test_results_over_two_ranks_are_equivariant_to_the_scale() -> None:
    """Sums over ranks (the exact part, P, Q, the server's chunk mean) stay exact at 2^-100 and 2^100."""
    ranks = run_ranks(_scaled_job, 2, timeout=150)
    for name in WIDE_RANGE:
        for k in RANK_SCALES[1:]:
            for step, (base, scaled) in enumerate(zip(ranks[0][f"{name}/0"], ranks[0][f"{name}/{k}"])):
                want = torch.ldexp(base, torch.tensor(k))
                assert torch.equal(scaled, want), f"{name} step {step}: out(2^{k} g) != 2^{k} out(g) on 2 ranks"
        assert all(torch.equal(a, b) for a, b in zip(ranks[0][f"{name}/0"], ranks[1][f"{name}/0"])), name
