"""The predictor's parts in this process: the alpha-beta collectives, the overlap timeline, the dry run's
payloads (against a real 2-rank run's telemetry), the stand-in shapes and the recommendation."""

from __future__ import annotations

import math

import pytest
import torch

from distcomp.bench import methods
from distcomp.bench.predict import Network, Workload, predict, step_time
from distcomp.bench.predict_cli import gpt_like_shapes, parse_latency, recommend
from distcomp.bench.traffic import BucketTraffic, Collective, Traffic, compressed_traffic, ddp_buckets, dense_traffic
from distcomp.testing import run_ranks

GBIT = Network(bandwidth_bits=1e9, latency_s=1e-4, efficiency=1.0)
SHAPES = [(256, 64), (64,), (64, 256), (256,), (512, 64)]


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        ("all_reduce", 2 * 7 * 1e-4 + 2 * 7 / 8 * 1e6 / 125e6),
        ("all_gather", 7 * 1e-4 + 7 * 1e6 / 125e6),
        ("all_to_all", 7 * 1e-4 + 7 / 8 * 1e6 / 125e6),
        ("reduce_scatter", 7 * 1e-4 + 7 / 8 * 1e6 / 125e6),
    ],
)
def test_ring_collectives_follow_alpha_beta(op: str, expected: float) -> None:
    c = Collective(op, 10**6)  # type: ignore[arg-type]
    assert GBIT.seconds(c, 8) == pytest.approx(expected)
    assert GBIT.seconds(c, 1) == 0.0


def test_one_bucket_exposes_all_its_communication_and_the_bound_none() -> None:
    wl = Workload(shapes=((1000,),), compute_s=1.0, backward_fraction=0.5)
    one = Traffic((BucketTraffic(1000, (Collective("all_reduce", 125_000_000),), 0.1),), overlap=False)
    p = step_time("m", one, wl, GBIT, 2)
    wire = GBIT.seconds(one.buckets[0].collectives[0], 2)
    assert p.exposed_s == pytest.approx(wire) and p.step_s == pytest.approx(1.0 + 0.1 + wire)
    assert step_time("noop", None, wl, GBIT, 64).step_s == 1.0


def test_buckets_overlap_backward_and_only_the_tail_is_exposed() -> None:
    wl = Workload(shapes=((1000,),), compute_s=1.0, backward_fraction=0.5)
    small = Collective("all_reduce", 1000)
    four = Traffic(tuple(BucketTraffic(250, (small,), 0.0) for _ in range(4)))
    p = step_time("m", four, wl, GBIT, 2)
    # The last bucket is ready as backward ends: only its own collective is exposed.
    assert p.exposed_s == pytest.approx(GBIT.seconds(small, 2))
    big = Collective("all_reduce", 50_000_000)  # 0.4 s each on the wire: the link falls behind
    slow = step_time("m", Traffic(tuple(BucketTraffic(250, (big,), 0.0) for _ in range(4))), wl, GBIT, 2)
    assert slow.exposed_s == pytest.approx(0.125 + 4 * GBIT.seconds(big, 2) - 0.5)


def test_ddp_buckets_fill_in_reverse_up_to_the_cap_and_cover_every_parameter() -> None:
    buckets = ddp_buckets(SHAPES, bucket_cap_mb=0.1)  # 26214 fp32 values each
    assert [i for b in buckets for i in b] == [4, 3, 2, 1, 0]
    sizes = [sum(math.prod(SHAPES[i]) for i in b) for b in buckets]
    assert all(s <= 26214 or len(b) == 1 for s, b in zip(sizes, buckets))
    assert sum(sizes) == dense_traffic(SHAPES, 0.1).numel


def test_dry_run_payload_of_sign_shrinks_with_world_size_and_is_one_bit_per_value() -> None:
    n = sum(math.prod(s) for s in SHAPES)
    small = compressed_traffic("sign", {}, SHAPES, 8, bucket_cap_mb=1.0, reps=1)
    big = compressed_traffic("sign", {}, SHAPES, 64, bucket_cap_mb=1.0, reps=1)
    to_all = sum(c.nbytes for b in small.buckets for c in b.collectives if c.op == "all_to_all")
    assert n / 8 <= to_all < 1.5 * n / 8  # signs, plus a scale per chunk and the alignment padding
    gathered = [sum(c.nbytes for b in t.buckets for c in b.collectives if c.op == "all_gather") for t in (small, big)]
    assert gathered[1] < gathered[0] / 4  # each rank gathers 1/world of the result
    assert small.codec_s > 0


def _real_sent(rank: int, world: int) -> dict[str, float]:
    """What each compressor's telemetry counts on a real 2-rank gloo group for the buckets of SHAPES."""
    from distcomp.bench.traffic import _bucket
    from distcomp.comm import BucketRecord, Comm
    from distcomp.registry import make_compressor

    out = {}
    for name, opts in (("none", {}), ("sign", {}), ("int8", {}), ("topk", {"ratio": 0.05}), ("powersgd", {"rank": 2})):
        comp, sent = make_compressor(name, {**opts, "start_step": 0}), 0.0
        layout = ddp_buckets(SHAPES, 1.0)
        for step in range(2):
            sent = 0.0
            for j, idx in enumerate(layout):
                bucket = _bucket(SHAPES, idx, "cpu", j)
                comm = Comm(None, BucketRecord(index=j, numel=bucket.numel))
                comp.reduce(bucket, comm, step, ends_step=j == len(layout) - 1)
                sent += comm.record.sent_bytes
        out[name] = sent
    return out


@pytest.mark.slow
def test_dry_run_sends_what_a_real_two_rank_run_counts() -> None:
    real = run_ranks(_real_sent, 2, timeout=120)[0]
    for name, opts in (("none", {}), ("sign", {}), ("int8", {}), ("topk", {"ratio": 0.05}), ("powersgd", {"rank": 2})):
        dry = compressed_traffic(name, opts, SHAPES, 2, bucket_cap_mb=1.0, reps=1)
        predicted = sum(GBIT.sent_bytes(c, 2) for b in dry.buckets for c in b.collectives)
        assert predicted == pytest.approx(real[name]), name


def test_gpt_like_stand_in_has_about_the_asked_size_and_small_counts_are_refused() -> None:
    for params in (1e6, 125e6, 1.3e9):
        n = sum(math.prod(s) for s in gpt_like_shapes(params))
        assert 0.6 * params < n < 1.6 * params
    with pytest.raises(ValueError, match="too small"):
        gpt_like_shapes(10)


def test_latency_parses_units_and_names_the_form_it_wants() -> None:
    assert parse_latency("50us") == pytest.approx(5e-5) and parse_latency("0.2ms") == pytest.approx(2e-4)
    with pytest.raises(ValueError, match="like 50us"):
        parse_latency("fast")


def test_recommendation_is_compression_on_a_slow_link_and_ddp_on_a_fast_one() -> None:
    torch.manual_seed(0)
    chosen = methods.select(["ddp", "noop", "powersgd"], warmup=3)
    wl = Workload(shapes=((1024, 1024), (1024, 1024), (1024,)), compute_s=0.05, bucket_cap_mb=4.0)
    slow, fast = Network(bandwidth_bits=100e6), Network(bandwidth_bits=400e9)
    forecast = predict(chosen, wl, [slow, fast], [16], reps=1)
    best, why = recommend(forecast, chosen, slow, 16, {})
    assert best == "powersgd" and "DDP spends" in why
    best, why = recommend(forecast, chosen, fast, 16, {})
    assert best == "ddp" and "little to win" in why


def test_predict_command_prints_a_table_per_link_with_its_recommendation(capsys: pytest.CaptureFixture[str]) -> None:
    from distcomp.cli import main

    argv = ["bench", "predict", "--params", "3e6", "--compute-ms", "200", "--world", "8,64",
            "--bandwidth", "100mbit,100gbit", "--methods", "ddp,noop,powersgd,topk"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("Predicted (not measured)")
    assert "## 100mbit" in out and "## 100gbit" in out
    rows = [line for line in out.splitlines() if line.startswith("| ddp |")]
    assert len(rows) == 2 and all(" · 1.00x · " in cell for row in rows for cell in row.split("|")[2:4])
    recommended = [line.split("|")[2:4] for line in out.splitlines() if line.startswith("| recommended |")]
    assert {c.strip() for c in recommended[0]} <= {"powersgd", "topk"}  # 100 Mbit/s: compression pays
    assert [c.strip() for c in recommended[1]] == ["ddp", "ddp"]  # 100 Gbit/s: it does not
