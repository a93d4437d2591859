"""Error feedback loses nothing: ``corrected == decoded + residual`` at every step.

Residuals are keyed by parameter name, so they survive DDP rebuilding its
buckets and a checkpoint does not depend on the bucket layout.
"""

from __future__ import annotations

import pytest
import torch

from distcomp import Bucket, CheckpointError
from distcomp.error_feedback import ErrorFeedback

SHAPES = {"fc.weight": (6, 5), "fc.bias": (6,), "conv.weight": (3, 2, 3, 3), "odd": (7,)}
LAYOUT_A = [("fc.weight", "fc.bias", "conv.weight", "odd")]
LAYOUT_B = [("odd", "conv.weight"), ("fc.bias", "fc.weight")]  # after a rebuild: other buckets, other order


def _grads(gen: torch.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {name: torch.randn(shape, generator=gen) * scale for name, shape in SHAPES.items()}


def _buckets(layout: list[tuple[str, ...]], grads: dict[str, torch.Tensor], dtype=torch.float32) -> list[Bucket]:
    return [Bucket.from_tensors([(n, grads[n].to(dtype)) for n in names], index=i) for i, names in enumerate(layout)]


def _lossy(x: torch.Tensor) -> torch.Tensor:
    """A stand-in for decode(encode(x)): keep values on a coarse grid."""
    return torch.round(x * 2) / 2


def _step(ef: ErrorFeedback, bucket: Bucket) -> tuple[torch.Tensor, torch.Tensor, float]:
    corrected = ef.corrected(bucket).clone()
    decoded = _lossy(corrected)
    norm = ef.stage(bucket, corrected, decoded)
    ef.end_step(keep=True)
    return corrected, decoded, norm


def _by_name(bucket: Bucket, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    return {n: v.clone() for n, v in bucket.views(flat)}


def test_invariant_holds_every_step_and_nothing_is_lost(gen: torch.Generator) -> None:
    ef = ErrorFeedback()
    total_in = {n: torch.zeros(s) for n, s in SHAPES.items()}
    total_out = {n: torch.zeros(s) for n, s in SHAPES.items()}
    for _ in range(6):
        grads = _grads(gen, scale=0.7)
        (bucket,) = _buckets(LAYOUT_A, grads)
        corrected, decoded, norm = _step(ef, bucket)
        residual = ef.residual(bucket)
        torch.testing.assert_close(decoded + residual, corrected, rtol=0, atol=1e-6)
        assert norm == pytest.approx(float(residual.norm()), rel=1e-6)
        assert norm > 0  # the grid drops something, so the test is not vacuous
        for name, g in grads.items():
            total_in[name] += g
        for name, d in _by_name(bucket, decoded).items():
            total_out[name] += d
    state = ef.state_dict()
    for name in SHAPES:
        torch.testing.assert_close(total_out[name] + state[name], total_in[name], rtol=0, atol=1e-5)


def test_corrected_adds_residual_in_place_for_fp32(gen: torch.Generator) -> None:
    ef = ErrorFeedback()
    (bucket,) = _buckets(LAYOUT_A, _grads(gen))
    _step(ef, bucket)
    residual = ef.residual(bucket).clone()
    grads = _grads(gen)
    (bucket,) = _buckets(LAYOUT_A, grads)
    before = bucket.buffer.clone()
    out = ef.corrected(bucket)
    assert out.data_ptr() == bucket.buffer.data_ptr()
    torch.testing.assert_close(out, before + residual, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_corrected_of_half_buffer_is_new_fp32(dtype: torch.dtype, gen: torch.Generator) -> None:
    ef = ErrorFeedback()
    (bucket,) = _buckets(LAYOUT_A, _grads(gen), dtype)
    corrected, decoded, _ = _step(ef, bucket)
    assert corrected.dtype == torch.float32
    residual = ef.residual(bucket)
    (bucket,) = _buckets(LAYOUT_A, _grads(gen), dtype)
    before = bucket.buffer.clone()
    out = ef.corrected(bucket)
    assert out.dtype == torch.float32 and out.data_ptr() != bucket.buffer.data_ptr()
    assert torch.equal(bucket.buffer, before)
    torch.testing.assert_close(out, before.float() + residual, rtol=0, atol=0)


def test_residuals_follow_parameters_across_a_bucket_rebuild(gen: torch.Generator) -> None:
    ef = ErrorFeedback()
    for _ in range(3):
        (bucket,) = _buckets(LAYOUT_A, _grads(gen))
        _step(ef, bucket)
    saved = ef.state_dict()
    assert set(saved) == set(SHAPES)

    # Zero gradients in the new layout: corrected is exactly the old residual of each name.
    zeros = {n: torch.zeros(s) for n, s in SHAPES.items()}
    for bucket in _buckets(LAYOUT_B, zeros):
        corrected = ef.corrected(bucket)
        for name, value in _by_name(bucket, corrected).items():
            assert torch.equal(value, saved[name]), name

    # The invariant keeps holding in the new layout, and state_dict still covers every name.
    for bucket in _buckets(LAYOUT_B, _grads(gen)):
        corrected, decoded, _ = _step(ef, bucket)
        torch.testing.assert_close(decoded + ef.residual(bucket), corrected, rtol=0, atol=1e-6)
    assert set(ef.state_dict()) == set(SHAPES)


def test_rebuild_into_a_subset_keeps_the_other_residuals(gen: torch.Generator) -> None:
    ef = ErrorFeedback()
    (bucket,) = _buckets(LAYOUT_A, _grads(gen))
    _step(ef, bucket)
    saved = ef.state_dict()
    (only_odd,) = _buckets([("odd",)], {"odd": torch.zeros(7)})
    assert torch.equal(ef.corrected(only_odd), saved["odd"])
    after = ef.state_dict()
    assert set(after) == set(SHAPES)
    for name in SHAPES:
        assert torch.equal(after[name], saved[name]), name


def test_state_dict_round_trip_per_name(gen: torch.Generator) -> None:
    ef = ErrorFeedback()
    for _ in range(2):
        (bucket,) = _buckets(LAYOUT_A, _grads(gen))
        _step(ef, bucket)
    state = ef.state_dict()
    assert {n: tuple(t.shape) for n, t in state.items()} == SHAPES
    assert all(t.dtype == torch.float32 for t in state.values())

    fresh = ErrorFeedback()
    fresh.load_state_dict(state, shapes={n: torch.Size(s) for n, s in SHAPES.items()})
    for name in SHAPES:
        assert torch.equal(fresh.state_dict()[name], state[name]), name
    # Both continue identically, even in another layout.
    grads = _grads(gen)
    for b_old, b_new in zip(_buckets(LAYOUT_B, grads), _buckets(LAYOUT_B, grads)):
        assert torch.equal(ef.corrected(b_old), fresh.corrected(b_new))


def test_state_dict_is_a_copy(gen: torch.Generator) -> None:
    ef = ErrorFeedback()
    (bucket,) = _buckets(LAYOUT_A, _grads(gen))
    _step(ef, bucket)
    state = ef.state_dict()
    want = {n: t.clone() for n, t in state.items()}
    for t in state.values():
        t.fill_(123.0)
    for name, t in ef.state_dict().items():
        assert torch.equal(t, want[name]), name
    loaded = ErrorFeedback()
    loaded.load_state_dict(want)
    for t in want.values():
        t.fill_(-1.0)
    assert not any(bool((t == -1.0).any()) for t in loaded.state_dict().values())


def test_wrong_size_residual_raises_when_shapes_are_known() -> None:
    ef = ErrorFeedback()
    state = {"fc.weight": torch.zeros(6, 5), "fc.bias": torch.zeros(5)}
    with pytest.raises(CheckpointError, match=r"'fc\.bias' has 5 elements.*parameter has 6"):
        ef.load_state_dict(state, shapes={n: torch.Size(s) for n, s in SHAPES.items()})


def test_wrong_size_residual_raises_at_first_use(gen: torch.Generator) -> None:
    ef = ErrorFeedback()
    ef.load_state_dict({"conv.weight": torch.zeros(3, 2, 3)})  # 18 values, the parameter has 54
    (bucket,) = _buckets(LAYOUT_A, _grads(gen))
    with pytest.raises(CheckpointError, match=r"'conv\.weight' has 18 elements.*54"):
        ef.corrected(bucket)


def test_disabled_keeps_nothing(gen: torch.Generator) -> None:
    ef = ErrorFeedback(enabled=False)
    for _ in range(2):
        grads = _grads(gen)
        (bucket,) = _buckets(LAYOUT_A, grads)
        before = bucket.buffer.clone()
        corrected = ef.corrected(bucket)
        assert torch.equal(corrected, before)
        assert ef.stage(bucket, corrected, _lossy(corrected)) == 0.0
        ef.end_step(keep=True)
    assert ef.state_dict() == {}


# -- staged residuals: fused encodes and whole steps kept or dropped ------------------------------


def _fused_step(ef: ErrorFeedback, bucket: Bucket, keep: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """What a fused encode does: read grad + residual, write the new residual into next_residual; keep if finite."""
    corrected = bucket.buffer.float() + ef.residual(bucket)
    decoded = _lossy(corrected)
    torch.sub(corrected, decoded, out=ef.next_residual(bucket))
    ef.stage(bucket)
    ef.end_step(keep)
    return corrected, decoded


def test_fused_steps_keep_the_invariant_across_buckets_of_different_sizes(gen: torch.Generator) -> None:
    ef = ErrorFeedback()
    for step in range(4):
        grads = _grads(gen)
        layout = LAYOUT_A if step % 2 == 0 else LAYOUT_B  # rebuilds between steps, buckets of other sizes
        for bucket in _buckets(layout, grads):
            corrected, decoded = _fused_step(ef, bucket)
            torch.testing.assert_close(decoded + ef.residual(bucket), corrected, rtol=0, atol=1e-6)
    # Buffers swap roles: no two buckets' residuals or next residuals share memory.
    buckets = _buckets(LAYOUT_B, _grads(gen))
    buffers = [ef.residual(b) for b in buckets] + [ef.next_residual(b) for b in buckets]
    ptrs = [t.untyped_storage().data_ptr() for t in buffers]
    assert len(set(ptrs)) == len(ptrs)


def test_dropped_step_leaves_the_residual_untouched(gen: torch.Generator) -> None:
    ef = ErrorFeedback()
    (bucket,) = _buckets(LAYOUT_A, _grads(gen))
    _fused_step(ef, bucket)
    before = {n: t.clone() for n, t in ef.state_dict().items()}
    (bad,) = _buckets(LAYOUT_A, _grads(gen))
    bad.buffer[3] = float("nan")
    _fused_step(ef, bad, keep=False)  # a non-finite step: next_residual holds NaN, nothing is kept
    for name, t in ef.state_dict().items():
        assert torch.equal(t, before[name]), name


def _stage_lossy(ef: ErrorFeedback, bucket: Bucket) -> float:
    corrected = ef.corrected(bucket).clone()
    return ef.stage(bucket, corrected, _lossy(corrected))


def test_a_step_of_several_buckets_is_kept_or_dropped_as_a_whole(gen: torch.Generator) -> None:
    """Buckets staged earlier in a step that is dropped leave no trace; a kept step updates every bucket."""
    ef = ErrorFeedback()
    for bucket in _buckets(LAYOUT_B, _grads(gen)):
        _stage_lossy(ef, bucket)
    ef.end_step(keep=True)
    before = {n: t.clone() for n, t in ef.state_dict().items()}
    first, _ = _buckets(LAYOUT_B, _grads(gen, scale=3.0))
    _stage_lossy(ef, first)  # a finite bucket...
    for name, t in ef.state_dict().items():
        assert torch.equal(t, before[name]), f"{name} changed before the step ended"
    ef.end_step(keep=False)  # ...then a later bucket of the same step was non-finite on some rank
    for name, t in ef.state_dict().items():
        assert torch.equal(t, before[name]), name
    buckets = _buckets(LAYOUT_B, _grads(gen, scale=3.0))
    norms = [_stage_lossy(ef, b) for b in buckets]
    ef.end_step(keep=True)
    after = ef.state_dict()
    assert all(not torch.equal(after[n], before[n]) for n in SHAPES)
    for bucket, norm in zip(buckets, norms):
        assert norm == pytest.approx(float(torch.cat([after[n].reshape(-1) for n in bucket.names]).norm()), rel=1e-6)


def test_fused_and_unfused_steps_give_the_same_residuals(gen: torch.Generator) -> None:
    fused, plain = ErrorFeedback(), ErrorFeedback()
    for _ in range(3):
        grads = _grads(gen)
        (bf,) = _buckets(LAYOUT_A, grads)
        (bp,) = _buckets(LAYOUT_A, grads)
        _fused_step(fused, bf)
        _step(plain, bp)
    for name, t in plain.state_dict().items():
        assert torch.equal(fused.state_dict()[name], t), name
    restored = ErrorFeedback()
    restored.load_state_dict(fused.state_dict())
    (b,) = _buckets(LAYOUT_A, _grads(gen))
    assert torch.equal(restored.residual(b), fused.residual(b))
