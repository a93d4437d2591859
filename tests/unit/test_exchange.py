"""The compressed exchange on one rank: what it keeps, when it keeps it, and its checkpoints.

``TwoPhaseExchange`` stages (DDP compressors: an ``ErrorFeedback`` worker store,
new residuals current only at ``end_step(keep=True)``) or applies at once
(optimizers: ``ImmediateResiduals`` over the caller's buffers). Either way the
mean and the residuals are those of the plain two-phase schedule.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

from distcomp import Bucket, CheckpointError
from distcomp.codecs import SignCodec
from distcomp.collectives import chunk_length, two_phase_mean
from distcomp.comm import BucketRecord, Comm
from distcomp.error_feedback import ErrorFeedback
from distcomp.exchange import ImmediateResiduals, TwoPhaseExchange
from distcomp.numerics import l2_norm, local_health

SHAPES = {"w": (9, 7), "b": (9,), "odd": (5,)}
CODEC = SignCodec(32)


def _bucket(gen: torch.Generator) -> Bucket:
    return Bucket.from_tensors([(n, torch.randn(s, generator=gen)) for n, s in SHAPES.items()])


def _staged() -> tuple[TwoPhaseExchange, ErrorFeedback]:
    ef = ErrorFeedback()
    return TwoPhaseExchange("test", lambda b: b.key, ef), ef


def _comm(numel: int) -> Comm:
    return Comm(None, BucketRecord(index=0, numel=numel))


def _step(exchange: TwoPhaseExchange, bucket: Bucket, keep: bool = True) -> tuple[torch.Tensor, BucketRecord]:
    """One staged step of one bucket; returns a copy of the mean and the record."""
    comm = _comm(bucket.numel)
    exchange.begin_step()
    res = exchange.reduce(comm, CODEC, bucket.buffer, bucket)
    exchange.end_step(keep)
    return res.out.clone(), comm.record


def _round_trip(state: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["world_size"] == b["world_size"] and set(a["server"]) == set(b["server"])
    assert all(torch.equal(a["server"][k], b["server"][k]) for k in a["server"])


def test_staged_step_equals_the_plain_schedule_and_keeps_both_residuals(pg1: None, gen: torch.Generator) -> None:
    exchange, ef = _staged()
    bucket = _bucket(gen)
    x = bucket.buffer.clone()
    out, rec = _step(exchange, bucket)
    plain = two_phase_mean(Comm(None), CODEC, x.clone(), None, local_health(x))
    assert torch.equal(out, plain.out)
    assert torch.equal(exchange.server[bucket.key], plain.server_error)
    assert torch.equal(ef.residual(bucket), x - plain.local_decoded)
    assert rec.residual_norm == l2_norm(ef.residual(bucket)) and not rec.nonfinite
    assert exchange.world_size == 1


def test_dropped_step_leaves_no_trace(pg1: None, gen: torch.Generator) -> None:
    exchange, ef = _staged()
    _step(exchange, _bucket(gen))
    before, residuals = exchange.state_dict(), ef.state_dict()
    _step(exchange, _bucket(gen), keep=False)
    _assert_same(exchange.state_dict(), before)
    assert all(torch.equal(ef.state_dict()[n], residuals[n]) for n in SHAPES)


def test_dropped_first_step_forgets_the_world_size(pg1: None, gen: torch.Generator) -> None:
    exchange, _ = _staged()
    _step(exchange, _bucket(gen), keep=False)
    assert exchange.world_size is None and not exchange.server


def test_nonfinite_step_is_recorded_and_keeps_nothing(pg1: None, gen: torch.Generator) -> None:
    exchange, ef = _staged()
    _step(exchange, _bucket(gen))
    before = exchange.state_dict()
    bad = _bucket(gen)
    bad.buffer[3] = float("nan")
    out, rec = _step(exchange, bad, keep=False)
    assert rec.nonfinite and not bool(torch.isfinite(out).all())
    _assert_same(exchange.state_dict(), before)


def test_state_dict_round_trip_resumes_bit_for_bit(pg1: None, gen: torch.Generator) -> None:
    exchange, ef = _staged()
    for _ in range(2):
        _step(exchange, _bucket(gen))
    fresh, fresh_ef = _staged()
    fresh.load_state_dict(_round_trip(exchange.state_dict()))
    fresh_ef.load_state_dict(_round_trip(ef.state_dict()))
    _assert_same(fresh.state_dict(), exchange.state_dict())
    for _ in range(2):
        bucket = _bucket(gen)
        twin = Bucket.from_tensors([(n, t.clone()) for n, t in bucket.views()])
        out_a, rec_a = _step(exchange, bucket)
        out_b, rec_b = _step(fresh, twin)
        assert torch.equal(out_a, out_b) and rec_a.residual_norm == rec_b.residual_norm
    _assert_same(fresh.state_dict(), exchange.state_dict())


def test_state_dict_is_a_copy(pg1: None, gen: torch.Generator) -> None:
    exchange, _ = _staged()
    bucket = _bucket(gen)
    _step(exchange, bucket)
    exchange.state_dict()["server"][bucket.key].fill_(7.0)
    assert not bool((exchange.server[bucket.key] == 7.0).all())


def test_immediate_residuals_apply_at_once_as_the_plain_math(pg1: None, gen: torch.Generator) -> None:
    """The optimizers' bookkeeping: ``x + werr`` is sent, ``werr = x + werr - decoded``, the server updated in place."""
    werr = torch.randn(40, generator=gen) * 0.1
    exchange = TwoPhaseExchange("test", lambda i: i, ImmediateResiduals({0: werr}.__getitem__), staged=False)
    x = torch.randn(40, generator=gen)
    corrected = x + werr
    health = local_health(x)
    comm = _comm(40)
    res = exchange.reduce(comm, CODEC, x.clone(), 0, health=health)
    plain = two_phase_mean(Comm(None), CODEC, corrected.clone(), torch.zeros(chunk_length(40, 1, 32)), health)
    assert torch.equal(res.out, plain.out)
    assert torch.equal(werr, corrected - plain.local_decoded)
    assert exchange.server[0] is res.server_error and torch.equal(res.server_error, plain.server_error)
    assert comm.record.residual_norm == l2_norm(werr)


def test_immediate_nonfinite_step_leaves_the_buffers_untouched(pg1: None, gen: torch.Generator) -> None:
    werr = torch.randn(40, generator=gen)
    exchange = TwoPhaseExchange("test", lambda i: i, ImmediateResiduals({0: werr}.__getitem__), staged=False)
    exchange.reduce(_comm(40), CODEC, torch.randn(40, generator=gen), 0)
    kept, server = werr.clone(), exchange.server[0].clone()
    x = torch.randn(40, generator=gen)
    x[1] = float("inf")
    comm = _comm(40)
    assert exchange.reduce(comm, CODEC, x, 0).nonfinite and comm.record.nonfinite
    assert torch.equal(werr, kept) and torch.equal(exchange.server[0], server)


def test_staged_and_immediate_give_the_same_numbers(pg1: None, gen: torch.Generator) -> None:
    """Fused worker error feedback (staged) against the corrected input formed first (immediate)."""
    staged, ef = _staged()
    buffers: dict[tuple[str, ...], torch.Tensor] = {}
    immediate = TwoPhaseExchange(
        "test",
        lambda b: b.key,
        ImmediateResiduals(lambda b: buffers.setdefault(b.key, torch.zeros(b.numel))),
        staged=False,
    )
    for _ in range(3):
        bucket = _bucket(gen)
        x = bucket.buffer.clone()
        out, _ = _step(staged, bucket)
        res = immediate.reduce(_comm(x.numel()), CODEC, x, bucket)
        assert torch.equal(out, res.out)
        assert torch.equal(ef.residual(bucket), buffers[bucket.key])
        assert torch.equal(staged.server[bucket.key], immediate.server[bucket.key])


def test_without_a_worker_store_nothing_is_kept(pg1: None, gen: torch.Generator) -> None:
    exchange = TwoPhaseExchange("test", lambda b: b.key)
    bucket = _bucket(gen)
    x = bucket.buffer.clone()
    out, rec = _step(exchange, bucket)
    assert torch.equal(out, two_phase_mean(Comm(None), CODEC, x, None, local_health(x)).out)
    assert not exchange.server and rec.residual_norm == 0.0


def test_server_residual_of_the_wrong_size_names_the_fix(pg1: None, gen: torch.Generator) -> None:
    exchange, _ = _staged()
    bucket = _bucket(gen)
    exchange.load_state_dict({"server": {bucket.key: torch.zeros(5)}, "world_size": 1})
    with pytest.raises(CheckpointError, match=r"server residual of bucket .* has 5 values, expected 96: .* resume"):
        _step(exchange, bucket)


def test_state_of_another_world_size_raises(pg1: None, gen: torch.Generator) -> None:
    exchange, _ = _staged()
    exchange.load_state_dict({"server": {}, "world_size": 2})
    with pytest.raises(CheckpointError, match="made for 2 ranks but this job has 1"):
        _step(exchange, _bucket(gen))


def test_load_of_a_partial_state_raises() -> None:
    with pytest.raises(CheckpointError, match=r"missing \['world_size'\]"):
        _staged()[0].load_state_dict({"server": {}})


def test_a_callers_server_dict_is_only_ever_updated_in_place(pg1: None, gen: torch.Generator) -> None:
    """The optimizers' checkpoint code reads the server errors from its own dict: the exchange never replaces it."""
    servers: dict[int, torch.Tensor] = {}
    werr = torch.zeros(40)
    exchange = TwoPhaseExchange("test", lambda i: i, ImmediateResiduals(lambda i: werr), staged=False, server=servers)
    exchange.reduce(_comm(40), CODEC, torch.randn(40, generator=gen), 0)
    assert set(servers) == {0} and bool(servers[0].abs().sum() > 0)
    exchange.load_state_dict(_round_trip(exchange.state_dict()))
    assert exchange.server is servers and set(servers) == {0}
    exchange.zero_()
    assert torch.equal(servers[0], torch.zeros_like(servers[0]))
