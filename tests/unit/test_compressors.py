"""Every registered compressor, called directly on a 1-rank gloo group.

With one rank the mean is the input itself, which makes the algorithms' own
invariants checkable exactly: ``none`` and the casts return the input, error
feedback loses nothing over a sequence of steps (outputs + final residuals ==
inputs), full-rank PowerSGD is the identity, a non-finite bucket leaves the
state untouched, and a checkpoint restores the identical next step.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

import distcomp
from distcomp import Bucket, CheckpointError
from distcomp.comm import BucketRecord, Comm

# Options that make each compressor lossy on the small buckets below.
OPTIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "fp16": {},
    "bf16": {},
    "powersgd": {"rank": 2},
    "topk": {"ratio": 0.1},
    "randomk": {"ratio": 0.1},
    "sign": {"block": 32},
    "int8": {"block": 32},
    "int4": {"block": 64},
}
ALL = list(OPTIONS)
EF = ["powersgd", "topk", "randomk", "sign", "int8", "int4"]
STATELESS = ["none", "fp16", "bf16"]

# Matrices (two of one shape, for PowerSGD's batching), a bias, a 4-D conv weight
# and odd sizes; 664 values in all, not a multiple of any block.
SHAPES: dict[str, tuple[int, ...]] = {
    "l1.weight": (16, 12),
    "l2.weight": (16, 12),
    "l1.bias": (16,),
    "conv.weight": (8, 3, 3, 3),
    "small": (5, 7),
    "odd": (13,),
}


def test_every_compressor_is_covered() -> None:
    assert sorted(OPTIONS) == distcomp.available_compressors()


def make(name: str, **overrides: Any) -> distcomp.Compressor:
    cfg = distcomp.build_config(name, {**OPTIONS[name], "start_step": 0, **overrides})
    return distcomp.get_compressor(name)(cfg)


def grads(gen: torch.Generator, shapes: dict[str, tuple[int, ...]] = SHAPES) -> list[tuple[str, torch.Tensor]]:
    return [(name, torch.randn(shape, generator=gen)) for name, shape in shapes.items()]


def reduce(comp: distcomp.Compressor, named: list[tuple[str, torch.Tensor]], step: int,
           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, BucketRecord]:
    """One ``reduce`` on copies of ``named``; returns a copy of the output and the record."""
    bucket = Bucket.from_tensors([(n, t.to(dtype)) for n, t in named])
    comm = Comm(group=None, record=BucketRecord(index=0, numel=bucket.numel))
    out = comp.reduce(bucket, comm, step)
    assert out.dtype == dtype and out.shape == (bucket.numel,)
    return out.clone(), comm.record


def flat(named: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for _, t in named])


def leftover(comp: distcomp.Compressor, named: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """What the compressor holds back for later, flat in bucket order: worker residuals + server residuals."""
    state = comp.state_dict()
    residuals = state.get("residuals", {})
    out = torch.cat([residuals.get(n, torch.zeros(t.shape)).reshape(-1) for n, t in named])
    for entry in state.get("server", []):
        if tuple(entry["names"]) == tuple(n for n, _ in named):
            out += entry["residual"][: out.numel()]
    return out


def round_trip(state: dict[str, Any]) -> dict[str, Any]:
    """Through ``torch.save`` / ``torch.load(weights_only=True)``, as a checkpoint does."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_state_equal(a: Any, b: Any, path: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_state_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# -- exact and cast compressors -----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_none_returns_the_input_exactly(pg1: None, gen: torch.Generator, dtype: torch.dtype) -> None:
    named = grads(gen)
    out, rec = reduce(make("none"), named, step=0, dtype=dtype)
    assert torch.equal(out, flat(named).to(dtype))
    assert rec.compressed and rec.collectives == 1 and rec.payload_bytes == out.numel() * out.element_size()


@pytest.mark.parametrize("name,wire", [("fp16", torch.float16), ("bf16", torch.bfloat16)], ids=["fp16", "bf16"])
def test_cast_returns_the_input_rounded_to_half(pg1: None, gen: torch.Generator, name: str, wire: torch.dtype) -> None:
    named = grads(gen)
    x = flat(named)
    out, rec = reduce(make(name), named, step=0)
    assert torch.equal(out, x.to(wire).float())
    assert not torch.equal(out, x)  # the cast really happened
    assert rec.payload_bytes == 2 * x.numel() and not rec.nonfinite
    # A bucket already in the wire dtype goes through untouched.
    out_h, _ = reduce(make(name), named, step=0, dtype=wire)
    assert torch.equal(out_h, x.to(wire))


# -- error feedback loses nothing ----------------------------------------------------


@pytest.mark.parametrize("name", EF)
def test_error_feedback_outputs_plus_residual_equal_inputs(pg1: None, gen: torch.Generator, name: str) -> None:
    comp = make(name)
    total_in = torch.zeros(sum(torch.Size(s).numel() for s in SHAPES.values()))
    total_out = torch.zeros_like(total_in)
    lossy_steps = 0
    for step in range(5):
        named = grads(gen)
        out, rec = reduce(comp, named, step)
        assert rec.compressed and not rec.nonfinite
        worker = torch.cat([comp.state_dict()["residuals"][n].reshape(-1) for n, _ in named])
        assert rec.residual_norm == pytest.approx(float(worker.norm()), rel=1e-5)
        total_in += flat(named)
        total_out += out
        lossy_steps += int(not torch.allclose(out, flat(named), rtol=0, atol=1e-4))
    assert lossy_steps == 5, "the compressor should drop something at every step"
    torch.testing.assert_close(total_out + leftover(comp, named), total_in, rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", EF)
def test_without_error_feedback_nothing_is_kept(pg1: None, gen: torch.Generator, name: str) -> None:
    comp = make(name, error_feedback=False)
    for step in range(2):
        _, rec = reduce(comp, grads(gen), step)
        assert rec.residual_norm == 0.0
    state = comp.state_dict()
    assert state["residuals"] == {}
    assert state.get("server", []) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name", ["sign", "int8", "int4"])
def test_fused_error_feedback_loses_nothing_at_every_step(
    pg1: None, gen: torch.Generator, name: str, dtype: torch.dtype
) -> None:
    """Worker and server residuals are written inside the encode kernels: per step (one rank),
    ``input + residuals before == output + residuals after``, half-precision buckets read as they are."""
    comp = make(name)
    held = torch.zeros(sum(torch.Size(s).numel() for s in SHAPES.values()))
    for step in range(3):
        named = grads(gen)
        x = flat(named).to(dtype).float()
        out, rec = reduce(comp, named, step, dtype=dtype)
        now = leftover(comp, named)
        # fp32 sums: a few roundings; a half-precision output is also rounded to its dtype.
        atol = 2e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps * float(out.float().abs().max())
        torch.testing.assert_close(out.float() + now, x + held, rtol=0, atol=atol)
        assert rec.residual_norm == pytest.approx(float(torch.cat(
            [comp.state_dict()["residuals"][n].reshape(-1) for n, _ in named]).norm()), rel=1e-5)
        held = now


# -- PowerSGD ---------------------------------------------------------------------


FULL_RANK_SHAPES = {"a": (8, 6), "b": (6, 12), "conv": (6, 3, 2, 2), "bias": (6,), "c": (6, 6)}


def test_powersgd_full_rank_is_the_identity(pg1: None, gen: torch.Generator) -> None:
    comp = make("powersgd", rank=6, min_compression_rate=0.0)
    for step in range(3):
        named = grads(gen, FULL_RANK_SHAPES)
        out, rec = reduce(comp, named, step)
        assert rec.compressed
        # fp32 Gram-Schmidt of 6 columns: about 1e-5 on values of order 1.
        torch.testing.assert_close(out, flat(named), rtol=0, atol=5e-5)
    assert set(comp.state_dict()["q"]) == {"a", "b", "conv", "c"}  # every matrix went through P and Q


def test_powersgd_rank_above_a_matrix_side_is_still_the_identity(pg1: None, gen: torch.Generator) -> None:
    # With min_compression_rate < 1 a matrix can have fewer rows or columns than
    # the rank; a rank-r approximation of it must then be exact, as in torch's
    # powerSGD_hook, which clamps the rank to min(n, m).
    comp = make("powersgd", rank=8, min_compression_rate=0.0)
    named = grads(gen, FULL_RANK_SHAPES)
    out, _ = reduce(comp, named, step=0)
    torch.testing.assert_close(out, flat(named), rtol=0, atol=5e-5)


def test_powersgd_sends_matrices_as_factors(pg1: None, gen: torch.Generator) -> None:
    named = grads(gen)
    _, rec = reduce(make("powersgd"), named, step=0)
    r = OPTIONS["powersgd"]["rank"]
    # l1/l2 (16x12) and conv (8x27) as P and Q; the bias, 'small' and 'odd' exactly.
    values = 2 * (16 + 12) * r + (8 + 27) * r + 16 + 35 + 13
    assert rec.payload_bytes == 4 * values
    assert rec.collectives == 2


def test_powersgd_batched_and_unbatched_agree(pg1: None, gen: torch.Generator) -> None:
    a = make("powersgd", batch_same_shape=True, seed=5)
    b = make("powersgd", batch_same_shape=False, seed=5)
    for step in range(3):
        named = grads(gen)
        out_a, _ = reduce(a, named, step)
        out_b, _ = reduce(b, named, step)
        torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-6)
    for name, t in a.state_dict()["residuals"].items():
        torch.testing.assert_close(t, b.state_dict()["residuals"][name], rtol=1e-5, atol=1e-6)


def test_powersgd_seed_changes_the_result(pg1: None, gen: torch.Generator) -> None:
    named = grads(gen)
    out_a, _ = reduce(make("powersgd", seed=1), named, step=0)
    out_b, _ = reduce(make("powersgd", seed=2), named, step=0)
    assert not torch.allclose(out_a, out_b)


# -- warm-up ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_steps_before_start_step_are_exact(pg1: None, gen: torch.Generator, name: str) -> None:
    comp = make(name, start_step=3)
    for step in range(3):
        named = grads(gen)
        out, rec = reduce(comp, named, step)
        assert torch.equal(out, flat(named)), f"step {step}"
        assert not rec.compressed
    assert not comp.state_dict().get("residuals")
    _, rec = reduce(comp, grads(gen), step=3)
    assert rec.compressed


@pytest.mark.parametrize("name", ALL)
def test_empty_bucket(pg1: None, name: str) -> None:
    out, _ = reduce(make(name), [], step=5)
    assert out.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ALL)
def test_half_precision_buckets(pg1: None, gen: torch.Generator, name: str, dtype: torch.dtype) -> None:
    comp = make(name)
    for step in range(2):
        out, rec = reduce(comp, grads(gen), step, dtype=dtype)
        assert bool(torch.isfinite(out).all()) and not rec.nonfinite
    for t in comp.state_dict().get("residuals", {}).values():
        assert t.dtype == torch.float32


# -- non-finite gradients -----------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("name", ALL)
def test_nonfinite_bucket_is_reported_and_leaves_state_untouched(
    pg1: None, gen: torch.Generator, name: str, bad: float
) -> None:
    comp = make(name)
    for step in range(2):
        reduce(comp, grads(gen), step)
    before = round_trip(comp.state_dict())
    named = grads(gen)
    named[3][1].view(-1)[5] = bad
    out, rec = reduce(comp, named, step=2)
    assert not bool(torch.isfinite(out).all())
    assert rec.nonfinite, "comm.record.nonfinite must report the non-finite gradient"
    assert_state_equal(comp.state_dict(), before)  # random streams included
    # The next finite step is not poisoned.
    out, rec = reduce(comp, grads(gen), step=3)
    assert bool(torch.isfinite(out).all()) and not rec.nonfinite


SPLIT = (["l1.weight", "l1.bias", "odd"], ["l2.weight", "conv.weight", "small"])


def reduce_step(comp: distcomp.Compressor, named: list[tuple[str, torch.Tensor]], step: int) -> list[BucketRecord]:
    """One step over two buckets (``SPLIT``), as a DDP backward pass hands them over; returns the records."""
    records = []
    for i, names in enumerate(SPLIT):
        bucket = Bucket.from_tensors([(n, t) for n, t in named if n in names], index=i)
        comm = Comm(group=None, record=BucketRecord(index=i, numel=bucket.numel))
        comp.reduce(bucket, comm, step, ends_step=i == len(SPLIT) - 1)
        records.append(comm.record)
    return records


@pytest.mark.parametrize("bad_bucket", [0, 1], ids=["first", "last"])
@pytest.mark.parametrize("name", ALL)
def test_one_nonfinite_bucket_drops_the_whole_steps_state(
    pg1: None, gen: torch.Generator, name: str, bad_bucket: int
) -> None:
    """The finite bucket of a step with a non-finite one keeps nothing either: residuals, Q, server
    residuals and random streams are as before the step, and the next steps go on as if it never happened."""
    comp, twin = make(name), make(name)
    for step in range(2):
        named = grads(gen)
        reduce_step(comp, named, step)
        reduce_step(twin, named, step)
    before = round_trip(comp.state_dict())
    named = grads(gen)
    victim = SPLIT[bad_bucket][0]
    dict(named)[victim].view(-1)[3] = float("nan")
    records = reduce_step(comp, named, step=2)
    assert [r.nonfinite for r in records] == [i == bad_bucket for i in range(2)]
    assert_state_equal(comp.state_dict(), before)
    named = grads(gen)
    reduce_step(comp, named, step=3)
    reduce_step(twin, named, step=3)
    assert_state_equal(comp.state_dict(), twin.state_dict())


def test_nonfinite_during_warmup_is_reported(pg1: None, gen: torch.Generator) -> None:
    named = grads(gen)
    named[0][1][0, 0] = float("nan")
    out, rec = reduce(make("powersgd", start_step=2), named, step=0)
    assert not rec.compressed and not bool(torch.isfinite(out).all())
    assert rec.nonfinite, "comm.record.nonfinite must report the non-finite gradient during warm-up too"


# -- checkpoints -------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_state_dict_resume_gives_the_identical_next_steps(pg1: None, gen: torch.Generator, name: str) -> None:
    comp = make(name)
    for step in range(3):
        reduce(comp, grads(gen), step)
    fresh = make(name)
    fresh.load_state_dict(round_trip(comp.state_dict()))
    assert_state_equal(fresh.state_dict(), comp.state_dict())
    for step in (3, 4):
        named = grads(gen)
        out_a, rec_a = reduce(comp, named, step)
        out_b, rec_b = reduce(fresh, named, step)
        assert torch.equal(out_a, out_b), f"step {step}"
        assert rec_a.residual_norm == rec_b.residual_norm


@pytest.mark.parametrize("name", EF)
def test_state_dict_is_not_empty_after_compressed_steps(pg1: None, gen: torch.Generator, name: str) -> None:
    comp = make(name)
    reduce(comp, grads(gen), step=0)
    residuals = comp.state_dict()["residuals"]
    assert set(residuals) == set(SHAPES)
    assert any(bool(t.abs().sum() > 0) for t in residuals.values())


def _twophase_state(**changes: Any) -> dict[str, Any]:
    return {"residuals": {}, "server": [], "world_size": 1, **changes}


BAD_STATES = [
    ("none", {"residuals": {}}, "keeps no state"),
    ("fp16", {"step": 3}, "keeps no state"),
    ("bf16", {"residuals": {}}, "keeps no state"),
    ("topk", {}, "no 'residuals'"),
    ("randomk", {"residuals": {}}, "no 'generator'"),
    ("sign", {"residuals": {}}, r"missing \['server', 'world_size'\]"),
    ("int8", _twophase_state(generator="not a tensor"), "malformed 'generator'"),
    ("int4", {"server": []}, "missing"),
    ("powersgd", {}, r"missing \['generator', 'q', 'residuals'\]"),
    ("powersgd", {"residuals": {}, "q": {"l1.weight": torch.zeros(12, 3)}, "generator": torch.Generator().get_state()},
     r"'l1\.weight' has shape \(12, 3\) but rank is 2"),
]


@pytest.mark.parametrize(
    "name,state,match", BAD_STATES,
    ids=["none", "fp16", "bf16", "topk-empty", "randomk-no-generator", "sign-partial", "int8-bad-generator",
         "int4-partial", "powersgd-empty", "powersgd-other-rank"],
)
def test_load_bad_state_raises(name: str, state: dict[str, Any], match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        make(name).load_state_dict(state)


@pytest.mark.parametrize("name", ["sign", "int8", "int4"])
def test_load_state_of_another_world_size_raises_at_first_step(pg1: None, gen: torch.Generator, name: str) -> None:
    comp = make(name)
    comp.load_state_dict(_twophase_state(world_size=2))
    with pytest.raises(CheckpointError, match="made for 2 ranks but this job has 1"):
        reduce(comp, grads(gen), step=0)


@pytest.mark.parametrize("name", ["sign", "int8"])
def test_load_server_residual_of_wrong_size_raises(pg1: None, gen: torch.Generator, name: str) -> None:
    comp = make(name)
    server = [{"names": list(SHAPES), "residual": torch.zeros(5)}]
    comp.load_state_dict(_twophase_state(server=server))
    with pytest.raises(CheckpointError, match="server residual .* 5 values"):
        reduce(comp, grads(gen), step=0)


@pytest.mark.parametrize("name", EF)
def test_load_residual_of_wrong_size_raises_naming_the_parameter(pg1: None, gen: torch.Generator, name: str) -> None:
    comp = make(name)
    reduce(comp, grads(gen), step=0)
    state = round_trip(comp.state_dict())
    state["residuals"]["conv.weight"] = torch.zeros(8, 3, 3)
    fresh = make(name)
    fresh.load_state_dict(state)
    with pytest.raises(CheckpointError, match=r"'conv\.weight' has 72 elements"):
        reduce(fresh, grads(gen), step=1)
