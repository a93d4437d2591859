"""Compressed collectives and ``Comm`` on real gloo ranks (world size 2 and 4).

One spawned job per world size runs every scenario and returns plain tensors;
the tests below assert on them in the parent, so a world size costs one spawn.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import distcomp
from distcomp import Bucket
from distcomp.codecs import IntCodec, SignCodec
from distcomp.collectives import _pieces, chunk_length, compressed_reduce_scatter, sparse_mean, two_phase_mean
from distcomp.comm import BucketRecord, Comm
from distcomp.numerics import local_health
from distcomp.testing import run_ranks

pytestmark = pytest.mark.slow  # the module's job runs on 2 and 4 ranks

N = 1001  # not a multiple of any world size times any block: the last chunk is padded
K = 37
A2A_COLS = 3
CODEC_NAMES = ["exact", "sign-b32", "int8-b32", "int4-b64-stochastic"]
COMPRESSOR_OPTIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "fp16": {},
    "powersgd": {"rank": 2},
    "topk": {"ratio": 0.05},
    "randomk": {"ratio": 0.05},
    "sign": {"block": 32},
    "int8": {"block": 32},
    "int4": {"block": 64},
}
SHAPES = {"w": (24, 20), "b": (24,), "conv": (6, 2, 3, 3), "odd": (11,)}
STEPS = 3


class ExactCodec:
    """fp32 as raw bytes: the two-phase schedule with no compression error."""

    align = 1

    def payload_bytes(self, length: int) -> int:
        return 4 * length

    def encode(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        out.view(torch.float32).copy_(rows)

    def decode(self, payload: torch.Tensor, length: int, out: torch.Tensor | None = None) -> torch.Tensor:
        values = payload.view(torch.float32)
        return values.clone() if out is None else out.view(values.shape).copy_(values)


def _codec(name: str, rank: int):
    if name == "exact":
        return ExactCodec()
    if name == "sign-b32":
        return SignCodec(32)
    if name == "int8-b32":
        return IntCodec(8, 32, None)
    return IntCodec(4, 64, torch.Generator().manual_seed(rank))


# -- what runs inside each rank (module level, so spawned processes can import it) ----


def _comm_scenario(rank: int, world: int) -> dict[str, Any]:
    comm = Comm(None, BucketRecord(index=0, numel=N))
    summed = comm.all_reduce(torch.full((6,), float(rank + 1)))
    gathered = comm.all_gather(torch.tensor([rank, 10 * rank], dtype=torch.int32))
    rows = torch.arange(world * A2A_COLS, dtype=torch.float32).view(world, A2A_COLS) + 100 * rank
    exchanged = comm.all_to_all(rows)
    return {"record": dataclasses.asdict(comm.record), "sum": summed, "gathered": gathered, "a2a": exchanged}


def _two_phase_scenario(rank: int, world: int, x: torch.Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in CODEC_NAMES:
        codec = _codec(name, rank)
        c = chunk_length(N, world, codec.align)
        prev = torch.randn(c, generator=torch.Generator().manual_seed(50 + rank)) * 0.01
        res = two_phase_mean(Comm(None), codec, x.clone(), prev.clone(), local_health(x))
        chunk, local, health = compressed_reduce_scatter(Comm(None), _codec(name, rank), x.clone(), local_health(x))
        out[name] = {
            "prev": prev, "out": res.out.clone(), "local": res.local_decoded.clone(),
            "server": res.server_error.clone(), "nonfinite": res.nonfinite,
            "rs_chunk": chunk.clone(), "rs_local": local.clone(), "rs_health": health.clone(),
        }
    return out


def _nonfinite_scenario(rank: int, world: int, x: torch.Tensor) -> dict[str, Any]:
    """The last rank's input holds a NaN; every rank must learn it from the payload's health word."""
    bad = x.clone()
    if rank == world - 1:
        bad[7] = float("nan")
    flags: dict[str, bool] = {}
    flags["two_phase"] = two_phase_mean(Comm(None), SignCodec(32), bad.clone(), None, local_health(bad)).nonfinite
    flags["sparse_mean"] = sparse_mean(Comm(None), bad.clone(), K, local_health(bad))[2]
    for name, options in COMPRESSOR_OPTIONS.items():
        if name == "none":
            continue  # the exact path reports nothing (see test_compressors)
        comp = distcomp.get_compressor(name)(distcomp.build_config(name, {**options, "start_step": 0}))
        comm = Comm(None, BucketRecord(index=0, numel=N))
        out = comp.reduce(Bucket.from_tensors([("x", bad.clone())]), comm, 0)
        flags[name] = comm.record.nonfinite and not bool(torch.isfinite(out).all())
    return flags


def _compressor_scenario(rank: int, world: int) -> dict[str, Any]:
    """Several steps of every compressor: outputs, inputs, and what each rank holds back."""
    gen = torch.Generator().manual_seed(1000 + rank)
    out: dict[str, Any] = {}
    for name, options in COMPRESSOR_OPTIONS.items():
        comp = distcomp.get_compressor(name)(distcomp.build_config(name, {**options, "start_step": 0}))
        inputs, outputs, records = [], [], []
        for step in range(STEPS):
            named = [(n, torch.randn(s, generator=gen)) for n, s in SHAPES.items()]
            bucket = Bucket.from_tensors(named)
            inputs.append(bucket.buffer.clone())
            comm = Comm(None, BucketRecord(index=0, numel=bucket.numel))
            outputs.append(comp.reduce(bucket, comm, step).clone())
            records.append(dataclasses.asdict(comm.record))
        state = comp.state_dict()
        residuals = state.get("residuals", {})
        worker = torch.cat([residuals.get(n, torch.zeros(s)).reshape(-1) for n, s in SHAPES.items()])
        server = [e["residual"] for e in state.get("server", [])]
        out[name] = {"inputs": inputs, "outputs": outputs, "records": records, "worker": worker, "server": server}
    return out


FUSED_CODECS = ["sign-b32", "int8-b32", "int4-b64-stochastic"]
SMALL_N = 70  # with 4 ranks and blocks of 32: a partial block and a row past the end


def _fused_scenario(rank: int, world: int, x: torch.Tensor) -> dict[str, Any]:
    """Worker error feedback fused into the encode, against the same step with ``x + residual`` formed first."""
    out: dict[str, Any] = {}
    for n in (N, SMALL_N):
        for name in FUSED_CODECS:
            xs, residual = x[:n].clone(), torch.randn(n, generator=torch.Generator().manual_seed(70 + rank)) * 0.1
            c = chunk_length(n, world, _codec(name, rank).align)
            prev = torch.randn(c, generator=torch.Generator().manual_seed(80 + rank)) * 0.01
            new, server, dest = torch.full((n,), float("nan")), prev.clone(), torch.empty(n)
            fused = two_phase_mean(Comm(None), _codec(name, rank), xs, server, None, residual=residual.clone(),
                                   residual_out=new, out=dest)
            corrected = xs + residual
            plain = two_phase_mean(
                Comm(None), _codec(name, rank), corrected.clone(), prev.clone(), local_health(corrected)
            )
            out[f"{name}-n{n}"] = {
                "x": xs, "residual": residual, "new": new, "out": fused.out.clone(), "out_is_dest": fused.out is dest,
                "server": fused.server_error.clone(), "server_in_place": fused.server_error is server,
                "local": fused.local_decoded.clone(), "plain_out": plain.out.clone(),
                "plain_server": plain.server_error.clone(), "plain_local": plain.local_decoded.clone(),
            }
    return out


def collectives_job(rank: int, world: int) -> dict[str, Any]:
    x = torch.randn(N, generator=torch.Generator().manual_seed(rank))
    x[:40] = 0.0  # a run of zeros
    x[100] = 50.0 * (rank + 1)  # an outlier
    return {
        "x": x,
        "comm": _comm_scenario(rank, world),
        "two_phase": _two_phase_scenario(rank, world, x),
        "fused": _fused_scenario(rank, world, x),
        "sparse": dict(zip(("mean", "local", "nonfinite"), sparse_mean(Comm(None), x.clone(), K, local_health(x)))),
        "nonfinite": _nonfinite_scenario(rank, world, x),
        "compressors": _compressor_scenario(rank, world),
    }


# -- the tests ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def job(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, Any]]]:
    world = request.param
    return world, run_ranks(collectives_job, world, timeout=120)


def _true_mean(results: list[dict[str, Any]]) -> torch.Tensor:
    return torch.stack([r["x"] for r in results]).mean(dim=0)


def test_comm_results_and_byte_accounting(job) -> None:
    world, results = job
    w = world
    for rank, r in enumerate(results):
        comm = r["comm"]
        assert torch.equal(comm["sum"], torch.full((6,), float(sum(range(1, w + 1)))))
        assert comm["gathered"].tolist() == [[j, 10 * j] for j in range(w)]
        want = torch.stack([torch.arange(A2A_COLS, dtype=torch.float32) + rank * A2A_COLS + 100 * j for j in range(w)])
        assert torch.equal(comm["a2a"], want)
        rec = comm["record"]
        ar, ag, a2a = 6 * 4, 2 * 4, w * A2A_COLS * 4
        assert rec["collectives"] == 3
        assert rec["payload_bytes"] == ar + ag + a2a
        assert rec["sent_bytes"] == pytest.approx(2 * (w - 1) / w * ar + (w - 1) * ag + (w - 1) / w * a2a)
        assert rec["dense_bytes"] == pytest.approx(2 * (w - 1) / w * 4 * N)
        assert rec["comm_s"] > 0


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_two_phase_every_rank_gets_the_same_mean(job, codec: str) -> None:
    _, results = job
    outs = [r["two_phase"][codec]["out"] for r in results]
    assert outs[0].shape == (N,)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    assert not any(r["two_phase"][codec]["nonfinite"] for r in results)


def test_two_phase_exact_codec_is_the_true_mean(job) -> None:
    _, results = job
    mean = _true_mean(results)
    for r in results:
        res = r["two_phase"]["exact"]
        assert torch.equal(res["local"], r["x"])
        torch.testing.assert_close(res["out"], mean + _server_input(results, "exact"), rtol=0, atol=1e-5)
        assert torch.equal(res["server"], torch.zeros_like(res["server"]))


def _server_input(results: list[dict[str, Any]], codec: str) -> torch.Tensor:
    """The previous server residuals every rank added to its chunk, laid end to end, cut to ``N``."""
    return torch.cat([r["two_phase"][codec]["prev"] for r in results])[:N]


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_two_phase_server_error_accounts_for_the_difference(job, codec: str) -> None:
    """Per chunk: ``out + server_error == mean of the ranks' decoded inputs + previous server error``."""
    world, results = job
    c = results[0]["two_phase"][codec]["server"].numel()
    assert c == chunk_length(N, world, _codec(codec, 0).align)
    decoded_mean = torch.stack([r["two_phase"][codec]["local"] for r in results]).mean(dim=0)
    server = torch.cat([r["two_phase"][codec]["server"] for r in results])[:N]
    out = results[0]["two_phase"][codec]["out"]
    torch.testing.assert_close(out + server, decoded_mean + _server_input(results, codec), rtol=0, atol=1e-5)


@pytest.mark.parametrize("codec", ["sign-b32", "int8-b32"])
def test_two_phase_worker_decode_matches_the_codec(job, codec: str) -> None:
    _, results = job
    for r in results:
        x, local = r["x"], r["two_phase"][codec]["local"]
        if codec == "sign-b32":
            # Same signs, and each block keeps its mean |x| (zero padding shares the last block).
            assert torch.equal(torch.where(local >= 0, 1.0, -1.0), torch.where(x >= 0, 1.0, -1.0))
            full = (N // 32) * 32
            torch.testing.assert_close(local[:full].abs().view(-1, 32).mean(1), x[:full].abs().view(-1, 32).mean(1),
                                       rtol=1e-5, atol=0)
        else:
            step = x[: (N // 32) * 32].view(-1, 32).abs().amax(1).repeat_interleave(32) / 127
            assert bool(((local[: step.numel()] - x[: step.numel()]).abs() <= step * 0.5 * (1 + 1e-5)).all())


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_compressed_reduce_scatter_gives_each_rank_its_chunk(job, codec: str) -> None:
    world, results = job
    decoded_mean = torch.stack([r["two_phase"][codec]["rs_local"] for r in results]).mean(dim=0)
    c = results[0]["two_phase"][codec]["rs_chunk"].numel()
    for rank, r in enumerate(results):
        res = r["two_phase"][codec]
        lo, hi = rank * c, min((rank + 1) * c, N)
        if lo < hi:
            torch.testing.assert_close(res["rs_chunk"][: hi - lo], decoded_mean[lo:hi], rtol=0, atol=1e-6)
        assert bool(torch.isfinite(res["rs_health"]).all()) and float(res["rs_health"]) == 0.0
    if codec == "exact":
        torch.testing.assert_close(decoded_mean, _true_mean(results), rtol=0, atol=1e-6)


def test_sparse_mean_scatter_adds_every_ranks_top_k(job) -> None:
    world, results = job
    want = torch.zeros(N)
    for r in results:
        idx = torch.topk(r["x"].abs(), K).indices
        want.index_add_(0, idx, r["x"][idx])
        local = torch.zeros(N)
        local[idx] = r["x"][idx]
        assert torch.equal(r["sparse"]["local"], local)
        assert not r["sparse"]["nonfinite"]
    for r in results:
        torch.testing.assert_close(r["sparse"]["mean"], want / world, rtol=0, atol=1e-6)
        assert torch.equal(r["sparse"]["mean"], results[0]["sparse"]["mean"])


@pytest.mark.parametrize("what", ["two_phase", "sparse_mean", *[n for n in COMPRESSOR_OPTIONS if n != "none"]])
def test_one_ranks_nan_is_reported_on_every_rank(job, what: str) -> None:
    _, results = job
    flags = [r["nonfinite"][what] for r in results]
    assert flags == [True] * len(results), f"nonfinite per rank: {flags}"


@pytest.mark.parametrize("name", list(COMPRESSOR_OPTIONS))
def test_compressors_keep_replicas_identical(job, name: str) -> None:
    _, results = job
    for step in range(STEPS):
        outs = [r["compressors"][name]["outputs"][step] for r in results]
        for rank, out in enumerate(outs[1:], start=1):
            assert torch.equal(out, outs[0]), f"step {step}: rank {rank} differs from rank 0"


@pytest.mark.parametrize("name", list(COMPRESSOR_OPTIONS))
def test_compressors_lose_nothing_across_ranks(job, name: str) -> None:
    """``sum of outputs + mean of worker residuals + server residuals == mean of the sum of inputs``."""
    world, results = job
    mine = [r["compressors"][name] for r in results]
    total_in = torch.stack([sum(m["inputs"]) for m in mine]).mean(dim=0)
    total_out = sum(mine[0]["outputs"])
    held = torch.stack([m["worker"] for m in mine]).mean(dim=0)
    if mine[0]["server"]:
        held = held + torch.cat([m["server"][0] for m in mine])[: held.numel()]
    tol = 1e-2 if name == "fp16" else 1e-4  # fp16 rounds the sum and keeps no residual
    torch.testing.assert_close(total_out + held, total_in, rtol=0, atol=tol)
    if name not in ("none", "fp16"):
        assert not torch.allclose(total_out, total_in, rtol=0, atol=1e-3), "the compressor should drop something"


def test_two_phase_compressor_byte_accounting(job) -> None:
    world, results = job
    n = sum(torch.Size(s).numel() for s in SHAPES.values())
    c = chunk_length(n, world, 32)
    row = SignCodec(32).payload_bytes(c) + 4
    for r in results:
        rec = r["compressors"]["sign"]["records"][-1]
        assert rec["collectives"] == 2
        assert rec["payload_bytes"] == world * row + row
        assert rec["sent_bytes"] == pytest.approx((world - 1) / world * world * row + (world - 1) * row)
        assert rec["dense_bytes"] / rec["sent_bytes"] > 5  # 1 bit + scales against 32-bit all-reduce


@pytest.mark.parametrize(
    "n,world,align", [(1001, 2, 32), (1001, 4, 64), (70, 4, 32), (64, 2, 32), (5, 4, 32), (1, 1, 32)]
)
def test_pieces_tile_the_rows_and_copy_only_the_last_block(n: int, world: int, align: int) -> None:
    c = chunk_length(n, world, align)
    covered = torch.zeros(world, c, dtype=torch.int32)
    src = []
    for p in _pieces(n, world, c, align):
        covered[p.rows, p.start : p.stop] += 1
        src.append((p.src, p.size))
        assert p.start % align == 0 and p.stop % align == 0
        if p.padded:  # only the partial block and rows past the end are copied
            assert p.size < align
    assert bool((covered == 1).all())
    pos = 0
    for start, size in src:
        assert start == pos
        pos += size
    assert pos == n


@pytest.mark.parametrize("case", [f"{c}-n{n}" for n in (N, SMALL_N) for c in FUSED_CODECS])
def test_fused_worker_error_feedback_matches_forming_the_corrected_input(job, case: str) -> None:
    """Bit for bit where the rounding is deterministic; ``input == decoded + new residual`` always."""
    world, results = job
    for r in results:
        f = r["fused"][case]
        corrected = f["x"] + f["residual"]
        assert f["out_is_dest"] and f["server_in_place"]
        torch.testing.assert_close(f["local"] + f["new"], corrected, rtol=0, atol=1e-6)
        if "stochastic" not in case:
            assert torch.equal(f["out"], f["plain_out"]) and torch.equal(f["server"], f["plain_server"])
            assert torch.equal(f["local"], f["plain_local"])
            assert torch.equal(f["new"], corrected - f["plain_local"])
    outs = [r["fused"][case]["out"] for r in results]
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
