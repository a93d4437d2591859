"""The counters every record of communication cost shares, and the shapes of what they report.

``Counters`` adds up over buckets and steps; a bucket's whole time splits into
communication and codec time; ``stats()`` keeps its keys (users and the training
loop's TensorBoard scalars read them); the run summary's means are sums over steps.
"""

from __future__ import annotations

import math

import pytest

from distcomp.comm import BucketRecord
from distcomp.telemetry import Counters, StepStats, Telemetry
from distcomp.train.telemetry import StepRecord, summarize

STEP_KEYS = ["step", "buckets", "numel", "dense_bytes", "payload_bytes", "sent_bytes", "collectives", "comm_s",
             "codec_s", "exposed_comm_s", "residual_norm", "nonfinite", "compressed", "ratio"]
BUCKET_KEYS = ["index", "numel", "dense_bytes", "payload_bytes", "sent_bytes", "collectives", "comm_s", "total_s",
               "exposed_comm_s", "residual_norm", "nonfinite", "compressed"]
TOTAL_KEYS = ["steps", "compressed_steps", "nonfinite_steps", "dense_bytes", "sent_bytes", "payload_bytes", "ratio",
              "comm_s", "codec_s", "exposed_comm_s"]


def _bucket(index: int, *, comm_s: float, total_s: float, residual: float = 0.0, **counts: float) -> BucketRecord:
    rec = BucketRecord(index=index, residual_norm=residual, **counts)  # type: ignore[arg-type]
    rec.comm_s = comm_s
    rec.total_s = total_s
    return rec


def test_counters_add_up_field_by_field() -> None:
    a = Counters(numel=3, dense_bytes=12.0, payload_bytes=4, sent_bytes=6.0, collectives=1, comm_s=0.5,
                 codec_s=0.25, residual_norm=3.0, compressed=True)
    b = Counters(numel=5, dense_bytes=20.0, payload_bytes=8, sent_bytes=10.0, collectives=2, comm_s=0.25,
                 codec_s=0.5, residual_norm=4.0, nonfinite=True)
    total = a + b
    assert (total.numel, total.dense_bytes, total.payload_bytes, total.sent_bytes, total.collectives) == (
        8, 32.0, 12, 16.0, 3)
    assert (total.comm_s, total.codec_s) == (0.75, 0.75)
    assert total.residual_norm == 5.0, "norms of disjoint pieces add in squares"
    assert total.nonfinite and total.compressed, "a flag of any part is the sum's"
    assert total.ratio == 2.0 and Counters().ratio == math.inf
    assert sum([a, b], Counters()) == total


def test_counters_sum_of_one_is_that_one_exactly() -> None:
    odd = Counters(residual_norm=0.1 + 0.2, dense_bytes=1e300, comm_s=1e-9)
    assert sum([odd], Counters()) == odd
    huge = Counters(residual_norm=1e300) + Counters(residual_norm=1e300)
    assert math.isfinite(huge.residual_norm), "adding norms in squares must not overflow"


def test_bucket_time_is_communication_plus_codec() -> None:
    rec = _bucket(0, comm_s=0.5, total_s=2.0)
    assert rec.codec_s == 1.5 and rec.total_s == 2.0
    never_set = BucketRecord(index=1, numel=4)
    never_set.comm_s = 0.25
    assert never_set.codec_s == 0.0, "a record that never set total_s has no codec time, never a negative one"


def test_stats_keep_their_keys_and_values() -> None:
    tel = Telemetry()
    tel.add(0, _bucket(0, comm_s=0.5, total_s=2.0, numel=4, dense_bytes=12.0, sent_bytes=3.0, residual=3.0))
    tel.add(0, _bucket(1, comm_s=0.25, total_s=0.5, numel=2, dense_bytes=6.0, sent_bytes=6.0, residual=4.0))
    step = tel.end_step()
    assert isinstance(step, StepStats) and step.buckets == 2
    stats = tel.summary()
    assert list(stats) == ["step", "buckets", "total"]
    assert list(stats["step"]) == STEP_KEYS
    assert [list(b) for b in stats["buckets"]] == [BUCKET_KEYS, BUCKET_KEYS]
    assert list(stats["total"]) == TOTAL_KEYS
    assert stats["step"]["codec_s"] == 1.5 + 0.25 and stats["step"]["residual_norm"] == 5.0
    assert stats["step"]["ratio"] == 2.0 and stats["buckets"][0]["total_s"] == 2.0
    tel.add(1, _bucket(0, comm_s=0.0, total_s=1.0, numel=4, dense_bytes=12.0, sent_bytes=3.0, nonfinite=True))
    tel.end_step()
    total = tel.summary()["total"]
    assert (total["steps"], total["nonfinite_steps"], total["dense_bytes"], total["sent_bytes"]) == (2, 1, 30.0, 12.0)
    assert total["codec_s"] == 2.75 and total["ratio"] == 2.5


def test_run_summary_means_come_from_the_step_counters() -> None:
    records = [StepRecord(step=s, loss=1.0, lr=0.1, step_s=0.01, dense_bytes=100.0, sent_bytes=10.0 * (s + 1),
                          comm_s=0.002, codec_s=0.001, compressed=s > 0) for s in range(3)]
    result = summarize("x", records, params=1, val_losses=[], loop_s=1.0, steps_run=3, wall_s=1.0,
                       interrupted=False)
    assert result.sent_bytes == 25.0 and result.dense_bytes == 100.0, "means over the steps after the warm-up"
    assert result.ratio == 200.0 / 50.0 and result.ratio_whole_run == 300.0 / 60.0
    assert result.codec_ms == pytest.approx(1.0) and result.comm_ms == pytest.approx(2.0)
    one_rank = summarize("x", [StepRecord(step=0, loss=1.0, lr=0.1, step_s=0.01)], params=1, val_losses=[],
                         loop_s=1.0, steps_run=1, wall_s=1.0, interrupted=False)
    assert math.isnan(one_rank.ratio) and one_rank.as_dict()["ratio"] is None, "nothing sent: no ratio (null)"
