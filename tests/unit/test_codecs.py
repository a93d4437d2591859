"""The payload formats of :mod:`distcomp.codecs`, against the plain-torch math they stand for.

A block codec (``SignCodec``, ``IntCodec``) turns fp32 rows into fixed-size byte
rows; the collectives append a 4-byte health word to each row and view it as
fp32, so every payload size must be a multiple of 4, and encoding must work into
a strided slice of a bigger buffer. The sparse and cast codecs are checked at
the end.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from distcomp.codecs import CastCodec, IntCodec, RandomKCodec, SignCodec, TopKCodec, is_fused

QMAX = {8: 127, 4: 7}

CODECS: dict[str, Callable[[], object]] = {
    "sign-b32": lambda: SignCodec(32),
    "sign-b2048": lambda: SignCodec(2048),
    "int8-b32-nearest": lambda: IntCodec(8, 32, None),
    "int8-b256-stochastic": lambda: IntCodec(8, 256, torch.Generator().manual_seed(3)),
    "int4-b32-nearest": lambda: IntCodec(4, 32, None),
    "int4-b64-stochastic": lambda: IntCodec(4, 64, torch.Generator().manual_seed(3)),
}


def _rows(kind: str, rows: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """fp32 rows of a given character."""
    if kind == "randn":
        return torch.randn(rows, length, generator=gen)
    if kind == "zeros":
        return torch.zeros(rows, length)
    if kind == "mixed":  # zero rows, zero blocks, a constant block and a lone spike
        x = torch.randn(rows, length, generator=gen)
        x[0] = 0.0
        x[1, : length // 2] = 0.0
        x[1, length // 2 :] = -0.25
        x[-1, :] = 1e-6
        x[-1, 3] = 1e3
        return x
    if kind == "scales":  # each row at another magnitude
        return torch.randn(rows, length, generator=gen) * torch.logspace(-30, 30, rows).unsqueeze(1)
    if kind == "fp16-origin":
        return (torch.randn(rows, length, generator=gen) * 1e-3).half().float()
    if kind == "bf16-origin":
        return (torch.randn(rows, length, generator=gen) * 1e3).bfloat16().float()
    raise ValueError(kind)


KINDS = ["randn", "zeros", "mixed", "scales", "fp16-origin", "bf16-origin"]


def _encode_strided(codec, x: torch.Tensor) -> torch.Tensor:
    """Encode into ``[payload | 4 sentinel bytes]`` rows, as the collectives do; return the payload part."""
    nbytes = codec.payload_bytes(x.shape[1])
    buf = torch.full((x.shape[0], nbytes + 4), 0xAB, dtype=torch.uint8)
    codec.encode(x, buf[:, :nbytes])
    assert bool((buf[:, nbytes:] == 0xAB).all()), "encode wrote past its payload"
    return buf[:, :nbytes]


@pytest.mark.parametrize("name", list(CODECS))
def test_payload_bytes_multiple_of_4(name: str) -> None:
    codec = CODECS[name]()
    for mult in (1, 2, 3, 5, 17):
        length = codec.align * mult
        nbytes = codec.payload_bytes(length)
        assert nbytes % 4 == 0, f"payload_bytes({length}) = {nbytes}"
        assert nbytes < 4 * length  # it compresses


@pytest.mark.parametrize(
    "name,length,want",
    [("sign-b32", 64, 8 + 8), ("sign-b2048", 4096, 512 + 8), ("int8-b32-nearest", 64, 64 + 8),
     ("int4-b32-nearest", 64, 32 + 8), ("int4-b64-stochastic", 192, 96 + 12)],
    ids=["sign-b32", "sign-b2048", "int8", "int4-b32", "int4-b64"],
)
def test_payload_bytes_formula(name: str, length: int, want: int) -> None:
    assert CODECS[name]().payload_bytes(length) == want


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block", [32, 2048], ids=["b32", "b2048"])
def test_sign_codec_round_trip(block: int, kind: str, gen: torch.Generator) -> None:
    codec = SignCodec(block)
    x = _rows(kind, 5, 2 * block, gen)
    payload = _encode_strided(codec, x)
    out = torch.empty(x.numel())
    decoded = codec.decode(payload, x.shape[1], out=out)
    assert decoded.shape == x.shape and decoded.data_ptr() == out.data_ptr()
    blocks = x.view(5, 2, block)
    scale = blocks.abs().mean(dim=-1, keepdim=True)
    want = torch.where(blocks >= 0, 1.0, -1.0) * scale
    torch.testing.assert_close(decoded.view(5, 2, block), want, rtol=1e-5, atol=0.0)  # summation order
    # mean(|x|) is the scale that minimises the error: never worse than sending zeros.
    err = (decoded - x).pow(2).sum(dim=1)
    assert bool((err <= x.pow(2).sum(dim=1) * (1 + 1e-5)).all())
    assert torch.equal(codec.decode(payload, x.shape[1]), decoded)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", [n for n in CODECS if n.startswith("int")])
def test_int_codec_round_trip_error_bound(name: str, kind: str, gen: torch.Generator) -> None:
    codec = CODECS[name]()
    block = codec.block
    x = _rows(kind, 5, 3 * block, gen)
    payload = _encode_strided(codec, x)
    decoded = codec.decode(payload, x.shape[1])
    assert decoded.shape == x.shape and decoded.dtype == torch.float32
    blocks = x.view(5, 3, block)
    step = blocks.abs().amax(dim=-1, keepdim=True) / QMAX[codec.bits]
    bound = step * (1.0 if codec.generator is not None else 0.5) * (1 + 1e-5)
    err = (decoded.view(5, 3, block) - blocks).abs()
    assert bool((err <= bound).all()), f"max error / step = {float((err / step.clamp_min(1e-38)).max()):.3f}"
    # The largest value of each block is represented exactly (it defines the scale).
    peak = blocks.abs().argmax(dim=-1, keepdim=True)
    torch.testing.assert_close(decoded.view(5, 3, block).gather(-1, peak), blocks.gather(-1, peak), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("name", [n for n in CODECS if n.startswith("int")])
def test_int_codec_zero_rows_decode_to_zero(name: str) -> None:
    codec = CODECS[name]()
    x = torch.zeros(2, 2 * codec.block)
    decoded = codec.decode(_encode_strided(codec, x), x.shape[1])
    assert torch.equal(decoded, x)


def test_int_codec_seeded_generator_is_reproducible(gen: torch.Generator) -> None:
    x = torch.randn(4, 256, generator=gen)
    a = _encode_strided(IntCodec(8, 64, torch.Generator().manual_seed(5)), x)
    b = _encode_strided(IntCodec(8, 64, torch.Generator().manual_seed(5)), x)
    c = _encode_strided(IntCodec(8, 64, torch.Generator().manual_seed(6)), x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# -- the fused protocol: error feedback in the encode, column ranges, decode-and-add ----------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(CODECS))
def test_encode_ef_loses_nothing(name: str, kind: str, gen: torch.Generator) -> None:
    """``grad + residual == decoded + new residual`` (one rounding of the subtraction), into a strided payload."""
    codec = CODECS[name]()
    grad = _rows(kind, 4, 2 * codec.block, gen)
    residual = torch.randn(grad.shape, generator=gen) * grad.abs().amax(dim=1, keepdim=True) * 0.1
    corrected = grad + residual
    nbytes = codec.payload_bytes(grad.shape[1])
    buf = torch.full((4, nbytes + 4), 0xAB, dtype=torch.uint8)
    new = torch.full_like(grad, float("nan"))
    health = codec.encode_ef(grad, residual, new, buf[:, :nbytes])
    assert bool((buf[:, nbytes:] == 0xAB).all()), "encode_ef wrote past its payload"
    assert health.shape == (1,) and float(health) == 0.0
    decoded = codec.decode(buf[:, :nbytes], grad.shape[1])
    err = (decoded + new - corrected).abs()
    assert bool((err <= 1e-6 * corrected.abs().amax(dim=1, keepdim=True)).all())
    assert not torch.isnan(new).any()


@pytest.mark.parametrize("name", [n for n in CODECS if "stochastic" not in n])
def test_column_ranges_encode_and_decode_like_whole_rows(name: str, gen: torch.Generator) -> None:
    """Pieces of a row encoded at their column offsets make the same payload as the whole row."""
    codec = CODECS[name]()
    length = 4 * codec.block
    x = torch.randn(3, length, generator=gen)
    whole = _encode_strided(codec, x)
    nbytes = codec.payload_bytes(length)
    buf = torch.full((3, nbytes + 4), 0xAB, dtype=torch.uint8)
    for lo, hi in ((0, codec.block), (codec.block, 3 * codec.block), (3 * codec.block, length)):
        codec.encode_ef(x[:, lo:hi].contiguous(), None, None, buf[:, :nbytes], length, lo)
    assert torch.equal(buf[:, :nbytes], whole) and bool((buf[:, nbytes:] == 0xAB).all())
    full = codec.decode(whole, length)
    lo, hi = codec.block, 3 * codec.block
    assert torch.equal(codec.decode(whole, length, start=lo, stop=hi), full[:, lo:hi].contiguous())


@pytest.mark.parametrize("name", list(CODECS))
def test_decode_add_is_decode_then_add(name: str, gen: torch.Generator) -> None:
    codec = CODECS[name]()
    length = 2 * codec.block
    payload = _encode_strided(codec, torch.randn(3, length, generator=gen))
    decoded = codec.decode(payload, length)
    start = torch.randn(length, generator=gen)
    summed = codec.decode_add(payload, length, start.clone(), alpha=0.5)
    torch.testing.assert_close(summed, start + 0.5 * decoded.sum(dim=0), rtol=1e-6, atol=1e-6)
    rows = codec.decode_add(payload, length, start.repeat(3), alpha=1.0)
    assert torch.equal(rows, start.repeat(3) + decoded.reshape(-1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("name", list(CODECS))
def test_encode_health_reports_nonfinite_input(name: str, bad: float, gen: torch.Generator) -> None:
    codec = CODECS[name]()
    x = torch.randn(2, 2 * codec.block, generator=gen)
    x[1, 5] = bad
    buf = torch.empty(2, codec.payload_bytes(x.shape[1]), dtype=torch.uint8)
    assert not bool(torch.isfinite(codec.encode_ef(x, None, None, buf)).all())
    assert not bool(torch.isfinite(codec.encode_ef(x, torch.zeros_like(x), torch.empty_like(x), buf)).all())


@pytest.mark.parametrize("name", [n for n in CODECS if "stochastic" not in n])
def test_encode_ef_is_the_encode_of_the_corrected_rows(name: str, gen: torch.Generator) -> None:
    """Fused: the payload of ``grad + residual``, and the new residual is ``grad + residual - decoded``, bit for bit."""
    codec = CODECS[name]()
    grad = torch.randn(3, 2 * codec.block, generator=gen)
    residual = torch.randn(grad.shape, generator=gen) * 0.1
    corrected = grad + residual
    plain = _encode_strided(codec, corrected)
    nbytes = codec.payload_bytes(grad.shape[1])
    fused, new = torch.empty(3, nbytes, dtype=torch.uint8), torch.empty_like(grad)
    codec.encode_ef(grad, residual, new, fused)
    assert torch.equal(fused, plain)
    assert torch.equal(new, corrected - codec.decode(plain, grad.shape[1]))
    in_place = residual.clone()
    codec.encode_ef(grad, in_place, None, fused)  # no residual_out: the new residual goes over the old
    assert torch.equal(in_place, new)


def test_block_codecs_are_fused_and_others_are_not() -> None:
    assert all(is_fused(make()) for make in CODECS.values())
    assert not any(is_fused(c) for c in (TopKCodec(3), CastCodec(torch.float16)))


# -- sparse and cast codecs ------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(50, 1), (50, 7), (5, 5)], ids=["k1", "k7", "k-all"])
def test_topk_codec_round_trip(n: int, k: int, gen: torch.Generator) -> None:
    codec = TopKCodec(k)
    x = torch.randn(n, generator=gen)
    payload = codec.encode(x)
    assert payload.dtype == torch.int32 and payload.shape == (codec.payload_numel(),)
    idx = x.abs().topk(k).indices
    want = torch.zeros(n).index_copy_(0, idx, x[idx])
    assert torch.equal(codec.decode(payload, n), want)
    out = torch.full((n,), float("nan"))
    assert codec.decode(payload, n, out=out) is out and torch.equal(out, want)


def test_topk_codec_decode_add_sums_every_row(gen: torch.Generator) -> None:
    codec, n = TopKCodec(4), 30
    xs = [torch.randn(n, generator=gen) for _ in range(3)]
    rows = torch.stack([codec.encode(x) for x in xs])
    start = torch.randn(n, generator=gen)
    want = start + sum(codec.decode(r, n) for r in rows)
    torch.testing.assert_close(codec.decode_add(rows, start.clone()), want, rtol=0, atol=1e-6)


def test_randomk_codec_round_trip_with_repeated_indices(gen: torch.Generator) -> None:
    n = 20
    codec = RandomKCodec(torch.tensor([3, 7, 3, 0]))
    x = torch.randn(n, generator=gen)
    payload = codec.encode(x)
    assert torch.equal(payload, x[[3, 7, 3, 0]])
    want = torch.zeros(n)
    want[[0, 3, 7]] = x[[0, 3, 7]]
    assert torch.equal(codec.decode(payload, n), want)  # a repeat is written, not added, twice
    start = torch.randn(n, generator=gen)
    summed = codec.decode_add(payload, start.clone(), alpha=0.5)
    assert torch.equal(summed, start + 0.5 * want)


def test_randomk_codec_draws_alike_from_alike_generators() -> None:
    a = RandomKCodec.draw(1000, 10, torch.Generator().manual_seed(4), torch.device("cpu"))
    b = RandomKCodec.draw(1000, 10, torch.Generator().manual_seed(4), torch.device("cpu"))
    assert torch.equal(a.indices, b.indices)
    assert a.indices.dtype == torch.int64 and bool((a.indices < 1000).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cast_codec_round_trip(dtype: torch.dtype, gen: torch.Generator) -> None:
    codec = CastCodec(dtype)
    x = torch.randn(33, generator=gen)
    payload = codec.encode(x)
    assert payload.dtype == dtype and torch.equal(payload, x.to(dtype))
    wire = torch.empty(33, dtype=dtype)
    assert codec.encode(x, out=wire) is wire and torch.equal(wire, payload)
    assert torch.equal(codec.decode(payload, out=torch.empty(33)), payload.float())
    start = torch.randn(33, generator=gen)
    assert torch.equal(codec.decode_add(payload, start.clone(), alpha=0.5), start + 0.5 * payload.float())
