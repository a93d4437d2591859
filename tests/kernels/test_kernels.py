"""The pure-torch reference kernels behind the codecs (``distcomp.kernels``).

Packing is checked bit-exactly, against loop-level Python written here, with
odd sizes and empty tensors; quantization against its error bounds and for
unbiased stochastic rounding; the fused and accumulating ops against the
plain ops they fuse; the public ops for clear errors on bad input; backend
selection, and ``import distcomp`` without Triton. The Triton kernels are
compared with these references in ``test_kernels_triton.py``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from distcomp.kernels import (
    backend,
    backend_reason,
    dequantize_blockwise,
    dequantize_codes,
    dequantize_codes_add,
    kernel_info,
    pack_int4,
    pack_signs,
    quantize_blockwise,
    quantize_codes,
    quantize_codes_ef,
    sign_decode,
    sign_decode_add,
    sign_encode,
    sign_encode_ef,
    topk_pack,
    topk_scatter_add,
    unpack_int4,
    unpack_signs,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
QMAX = {8: 127, 4: 7}


def _signs(x: torch.Tensor) -> torch.Tensor:
    """+1 where ``x >= 0`` (zero included), -1 elsewhere, as fp32."""
    return torch.where(x.reshape(-1).float() >= 0, 1.0, -1.0)


def _loop_pack_signs(values: list[float]) -> bytes:
    """Bit ``i`` of byte ``j`` is set iff ``values[8 j + i] >= 0``; the last byte is zero-padded."""
    out = bytearray((len(values) + 7) // 8)
    for pos, v in enumerate(values):
        if v >= 0:
            out[pos // 8] |= 1 << (pos % 8)
    return bytes(out)


def _random_with_zeros(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, generator=gen).to(dtype)
    x[::5] = 0.0
    x[1::7] = -0.0
    return x


# -- sign packing --------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000003], ids=lambda n: f"n{n}")
def test_pack_unpack_signs_round_trip(n: int, dtype: torch.dtype, gen: torch.Generator) -> None:
    x = _random_with_zeros(n, dtype, gen)
    bits = pack_signs(x)
    assert bits.dtype == torch.uint8
    assert bits.shape == ((n + 7) // 8,)
    back = unpack_signs(bits, n, dtype)
    assert back.dtype == dtype
    assert torch.equal(back.float(), _signs(x))


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 100, 1003], ids=lambda n: f"n{n}")
def test_pack_signs_bit_layout_matches_loop_reference(n: int, gen: torch.Generator) -> None:
    x = _random_with_zeros(n, torch.float32, gen)
    assert bytes(pack_signs(x).tolist()) == _loop_pack_signs(x.tolist())


def test_zero_and_negative_zero_pack_as_plus_one() -> None:
    x = torch.tensor([0.0, -0.0, -1e-30, 1e-30, -1.0, 2.0, 0.0, -3.0, 0.0])
    bits = pack_signs(x)
    assert bits.tolist() == [0b01101011, 0b00000001]
    assert unpack_signs(bits, 9).tolist() == [1, 1, -1, 1, -1, 1, 1, -1, 1]


def test_pack_signs_flattens_any_shape(gen: torch.Generator) -> None:
    x = torch.randn(3, 5, 7, generator=gen)
    assert torch.equal(pack_signs(x), pack_signs(x.reshape(-1)))


# -- sign codec ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows,length,block", [(1, 32, 32), (3, 256, 64), (2, 4096, 2048)], ids=["1x32b32", "3x256b64", "2x4096b2048"])
def test_sign_encode_scale_is_block_mean_abs_and_decode_is_exact(
    rows: int, length: int, block: int, dtype: torch.dtype, gen: torch.Generator
) -> None:
    x = torch.randn(rows, length, generator=gen).to(dtype)
    x[0, :block] = 0.0  # an all-zero block has scale 0
    bits, scales = sign_encode(x, block)
    assert bits.shape == (rows, length // 8) and bits.dtype == torch.uint8
    assert scales.shape == (rows, length // block) and scales.dtype == torch.float32
    want = x.float().abs().reshape(rows, length // block, block).mean(dim=-1)
    torch.testing.assert_close(scales, want, rtol=1e-6, atol=0.0)
    assert scales[0, 0] == 0.0

    decoded = sign_decode(bits, scales, block)
    expected = _signs(x).view(rows, length // block, block) * scales.unsqueeze(-1)
    assert torch.equal(decoded, expected.view(rows, length))

    out = torch.full((rows * length,), 7.0)
    sign_decode(bits, scales, block, out=out)
    assert torch.equal(out.view(rows, length), decoded)


# -- block-wise quantization ---------------------------------------------------


def _block_scales(x: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    rows, length = x.shape
    return x.float().abs().reshape(rows, length // block, block).amax(dim=-1) / QMAX[bits]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("bits", [8, 4], ids=["int8", "int4"])
def test_quantize_error_bounds(bits: int, stochastic: bool, dtype: torch.dtype, gen: torch.Generator) -> None:
    block = 64
    x = (torch.randn(4, 8 * block, generator=gen) * torch.logspace(-3, 3, 4).unsqueeze(1)).to(dtype)
    x[1, :block] = 0.0
    q, scales = quantize_blockwise(x, bits, block, gen if stochastic else None)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert int(q.abs().max()) <= QMAX[bits]
    torch.testing.assert_close(scales, _block_scales(x, bits, block), rtol=1e-6, atol=0.0)

    deq = dequantize_blockwise(q, scales, block)
    err = (deq - x.float()).abs().view(4, 8, block)
    step = scales.unsqueeze(-1)
    bound = step * (1.0 if stochastic else 0.5) * (1 + 1e-5)
    assert bool((err <= bound).all()), f"max error / scale = {float((err / step.clamp_min(1e-30)).max()):.4f}"
    assert torch.equal(deq[1, :block], torch.zeros(block))


@pytest.mark.parametrize("magnitude", [1e-37, 1e-39], ids=["1e-37", "1e-39"])
@pytest.mark.parametrize("bits", [8, 4], ids=["int8", "int4"])
def test_quantize_tiny_blocks_keep_the_error_bound(bits: int, magnitude: float, gen: torch.Generator) -> None:
    # absmax / qmax is subnormal here, so its reciprocal overflows to inf.
    x = torch.randn(2, 64, generator=gen) * magnitude
    q, scales = quantize_blockwise(x, bits, 32)
    err = (dequantize_blockwise(q, scales, 32) - x).abs().view(2, 2, 32)
    step = scales.unsqueeze(-1)
    assert bool((err <= step * 0.5 * (1 + 1e-3)).all()), f"max error / scale = {float((err / step).max()):.1f}"


@pytest.mark.parametrize("bits", [8, 4], ids=["int8", "int4"])
def test_stochastic_rounding_is_unbiased(bits: int, gen: torch.Generator) -> None:
    block, draws = 32, 4000
    x = torch.randn(1, 2 * block, generator=gen)
    q, scales = quantize_blockwise(x.expand(draws, -1), bits, block, gen)
    deq = dequantize_blockwise(q, scales, block).view(draws, -1)
    step = scales[0].repeat_interleave(block)
    # One draw errs by up to a whole step; the mean of 4000 is within ~0.03 step
    # (4 sigma of the mean) plus the 1/512-step bias of the 256-level dither.
    assert float(((deq - x) / step).abs().max()) > 0.5
    bias = (deq.mean(dim=0) - x[0]) / step
    worst = int(bias.abs().argmax())
    assert float(bias.abs().max()) < 0.05, f"element {worst} is biased by {float(bias[worst]):+.3f} of a step"
    # Round-to-nearest of the same data is biased by up to half a step.
    q0, s0 = quantize_blockwise(x, bits, block)
    assert float(((dequantize_blockwise(q0, s0, block) - x)[0] / step).abs().max()) > 0.1


@pytest.mark.parametrize("position", [0, 1, 2, 3], ids=lambda p: f"pos{p}")
def test_stochastic_rounding_dither_is_uniform_at_every_position(position: int, gen: torch.Generator) -> None:
    # Values 0.1 step above a code must round up 10% of the time at every element
    # position (the dither is drawn as 4 bytes per 32-bit word).
    rows = 20000
    x = torch.full((rows, 32), 12.1 / 127)
    x[:, 31] = 1.0  # scale = 1 / 127, so the other values sit at 12.1 steps
    q, _ = quantize_blockwise(x, 8, 32, gen)
    up = (q[:, position] == 13).float().mean()
    assert abs(float(up) - 0.1) < 0.01, f"rounded up {float(up):.3f} of the time, expected 0.100"


@pytest.mark.parametrize("bits", [8, 4], ids=["int8", "int4"])
def test_stochastic_rounding_reproducible_with_seed(bits: int) -> None:
    x = torch.randn(8, 512, generator=torch.Generator().manual_seed(0))
    q1, s1 = quantize_blockwise(x, bits, 256, torch.Generator().manual_seed(7))
    q2, s2 = quantize_blockwise(x, bits, 256, torch.Generator().manual_seed(7))
    q3, _ = quantize_blockwise(x, bits, 256, torch.Generator().manual_seed(8))
    assert torch.equal(q1, q2) and torch.equal(s1, s2)
    assert not torch.equal(q1, q3)


def test_dequantize_into_out(gen: torch.Generator) -> None:
    x = torch.randn(2, 128, generator=gen)
    q, scales = quantize_blockwise(x, 8, 64)
    out = torch.full((256,), float("nan"))
    res = dequantize_blockwise(q, scales, 64, out=out)
    assert torch.equal(out.view(2, 128), dequantize_blockwise(q, scales, 64))
    assert res.data_ptr() == out.data_ptr()


# -- int4 packing ------------------------------------------------------------------


def test_pack_int4_round_trip_all_values() -> None:
    values = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(values, values).reshape(1, -1)  # every (low, high) combination
    packed = pack_int4(pairs)
    assert packed.dtype == torch.uint8 and packed.shape == (1, pairs.shape[1] // 2)
    assert torch.equal(unpack_int4(packed), pairs)


def test_pack_int4_nibble_layout() -> None:
    q = torch.tensor([[1, -1, -8, 7, 0, -7]], dtype=torch.int8)
    assert pack_int4(q).tolist() == [[0xF1, 0x78, 0x90]]


@pytest.mark.parametrize("shape", [(0,), (2,), (3, 10), (2, 3, 4)], ids=["empty", "1d", "2d", "3d"])
def test_pack_int4_shapes(shape: tuple[int, ...], gen: torch.Generator) -> None:
    q = torch.randint(-7, 8, shape, generator=gen, dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(unpack_int4(packed), q)


# -- top-k -------------------------------------------------------------------------


def _split_payload(payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = payload.numel() // 2
    return payload[:k].view(torch.float32), payload[k:].to(torch.int64)


def _spiky(n: int, gen: torch.Generator) -> torch.Tensor:
    # Large values only at odd positions: a strided sample sees none of them.
    x = torch.randn(n, generator=gen) * 1e-3
    x[1::2] += torch.randn(x[1::2].numel(), generator=gen)
    return x


@pytest.mark.parametrize(
    "n,k,kind",
    [(1, 1, "randn"), (10, 0, "randn"), (10, 10, "randn"), (1000, 37, "randn"), (1000003, 1000, "randn"),
     (200003, 20000, "randn"), (300000, 500, "spiky"), (300000, 500, "ties")],
    ids=["n1k1", "k0", "k_eq_n", "n1000k37", "n1M_k1000", "n200k_k20000", "spiky", "ties"],
)
def test_topk_pack_matches_torch_topk(n: int, k: int, kind: str, gen: torch.Generator) -> None:
    if kind == "spiky":
        x = _spiky(n, gen)
    elif kind == "ties":
        x = torch.randint(-3, 4, (n,), generator=gen).float()
    else:
        x = torch.randn(n, generator=gen)
    payload = topk_pack(x, k)
    assert payload.dtype == torch.int32 and payload.shape == (2 * k,)
    values, indices = _split_payload(payload)
    assert indices.unique().numel() == k
    assert torch.equal(values, x[indices])
    want = torch.topk(x.abs(), k).values
    assert torch.equal(values.abs().sort(descending=True).values, want)
    if kind != "ties":
        assert torch.equal(indices.sort().values, torch.topk(x.abs(), k).indices.sort().values)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_topk_pack_half_values_are_fp32(dtype: torch.dtype, gen: torch.Generator) -> None:
    x = torch.randn(100, generator=gen).to(dtype)
    values, indices = _split_payload(topk_pack(x, 5))
    assert torch.equal(values, x[indices].float())


def test_topk_scatter_add_sums_duplicates(gen: torch.Generator) -> None:
    n, k, rows = 50, 8, 4
    xs = [torch.randn(n, generator=gen) for _ in range(rows)]
    xs[1][:k] = 100.0 + torch.arange(k)  # rows 1 and 2 pick the same indices
    xs[2][:k] = -50.0 - torch.arange(k)
    xs[0][:k] = 0.0  # rows 0 and 3 pick none of them
    xs[3][:k] = 0.0
    payloads = torch.stack([topk_pack(x, k) for x in xs])
    out = torch.full((n,), 0.5)
    res = topk_scatter_add(out, payloads)
    assert res is out
    want = torch.full((n,), 0.5)
    for row in payloads:
        values, indices = _split_payload(row)
        for v, i in zip(values.tolist(), indices.tolist()):
            want[i] += v
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[:k], 0.5 + 50.0 + torch.zeros(k), rtol=0, atol=1e-5)


# -- errors of the public ops --------------------------------------------------------


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: pack_signs(torch.ones(8, dtype=torch.int32)), TypeError, "pack_signs: expected a float32/float16/bfloat16"),
        (lambda: unpack_signs(torch.ones(2), 8), TypeError, "unpack_signs: bits must be torch.uint8"),
        (lambda: unpack_signs(torch.zeros(2, dtype=torch.uint8), 17), ValueError, "numel=17 does not fit in 2 bytes"),
        (lambda: unpack_signs(torch.zeros(2, dtype=torch.uint8), -1), ValueError, "numel=-1"),
        (lambda: sign_encode(torch.ones(2, 64, dtype=torch.float64), 32), TypeError, "sign_encode: expected a float32"),
        (lambda: sign_encode(torch.ones(64), 32), ValueError, "expected 2-D rows"),
        (lambda: sign_encode(torch.ones(2, 48), 32), ValueError, r"last dimension \(48\).*block=32"),
        (lambda: sign_encode(torch.ones(2, 48), 0), ValueError, "block=0"),
        (lambda: sign_decode(torch.zeros(1, 4, dtype=torch.uint8), torch.ones(1, 2), 32), ValueError, "do not match"),
        (lambda: sign_decode(torch.zeros(1, 4), torch.ones(1, 1), 32), TypeError, "bits must be torch.uint8"),
        (lambda: sign_decode(torch.zeros(1, 4, dtype=torch.uint8), torch.ones(1, 1, dtype=torch.float64), 32),
         TypeError, "scales must be torch.float32"),
        (lambda: sign_decode(torch.zeros(1, 4, dtype=torch.uint8), torch.ones(1, 1), 32, out=torch.empty(31)),
         ValueError, "out must be a contiguous float32"),
        (lambda: quantize_blockwise(torch.ones(1, 64, dtype=torch.int8), 8, 32), TypeError, "quantize_blockwise: expected a float32"),
        (lambda: quantize_blockwise(torch.ones(1, 64), 3, 32), ValueError, "bits must be 8 or 4, got 3"),
        (lambda: quantize_blockwise(torch.ones(64), 8, 32), ValueError, "expected 2-D rows"),
        (lambda: quantize_blockwise(torch.ones(1, 64), 8, 48), ValueError, r"last dimension \(64\).*block=48"),
        (lambda: quantize_blockwise(torch.ones(1, 64), 8, -32), ValueError, "block=-32"),
        (lambda: dequantize_blockwise(torch.ones(1, 64), torch.ones(1, 2), 32), TypeError, "q must be torch.int8"),
        (lambda: dequantize_blockwise(torch.ones(1, 64, dtype=torch.int8), torch.ones(1, 3), 32), ValueError, "do not match 3 blocks"),
        (lambda: dequantize_blockwise(torch.ones(1, 64, dtype=torch.int8), torch.ones(1, 2), 32, out=torch.empty(64, dtype=torch.float16)),
         ValueError, "out must be a contiguous float32"),
        (lambda: pack_int4(torch.ones(1, 3, dtype=torch.int8)), ValueError, "last dimension must be even"),
        (lambda: pack_int4(torch.ones(1, 4, dtype=torch.int32)), TypeError, "pack_int4: q must be torch.int8"),
        (lambda: unpack_int4(torch.ones(4, dtype=torch.int8)), TypeError, "unpack_int4: packed must be torch.uint8"),
        (lambda: topk_pack(torch.ones(10), 11), ValueError, "k=11 must be between 0 and numel=10"),
        (lambda: topk_pack(torch.ones(10), -1), ValueError, "k=-1 must be between"),
        (lambda: topk_pack(torch.ones(10, dtype=torch.int64), 1), TypeError, "topk_pack: expected a float32"),
        (lambda: topk_scatter_add(torch.zeros(4, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.int32)),
         TypeError, "out must be torch.float32"),
        (lambda: topk_scatter_add(torch.zeros(4), torch.zeros(1, 2, dtype=torch.int64)), TypeError, "payloads must be torch.int32"),
        (lambda: topk_scatter_add(torch.zeros(4), torch.zeros(1, 3, dtype=torch.int32)), ValueError, "even length"),
    ],
    ids=[
        "pack_signs-int", "unpack_signs-float-bits", "unpack_signs-too-many", "unpack_signs-negative",
        "sign_encode-fp64", "sign_encode-1d", "sign_encode-bad-block", "sign_encode-zero-block",
        "sign_decode-mismatch", "sign_decode-float-bits", "sign_decode-fp64-scales", "sign_decode-bad-out",
        "quantize-int", "quantize-bits3", "quantize-1d", "quantize-bad-block", "quantize-negative-block",
        "dequantize-float-q", "dequantize-mismatch", "dequantize-bad-out",
        "pack_int4-odd", "pack_int4-int32", "unpack_int4-int8",
        "topk-k-too-big", "topk-k-negative", "topk-int", "scatter-fp64-out", "scatter-int64-payload", "scatter-odd-row",
    ],
)
def test_public_ops_reject_bad_input(call, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        call()


# -- fused and accumulating ops (reference path on CPU) -------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sign_encode_ef_is_encode_of_corrected_and_loses_nothing(dtype: torch.dtype, gen: torch.Generator) -> None:
    grad = torch.randn(3, 256, generator=gen).to(dtype)
    residual = torch.randn(3, 256, generator=gen)
    corrected = grad.float() + residual
    bits, scales = sign_encode_ef(grad, residual, 64)
    want_bits, want_scales = sign_encode(corrected, 64)
    assert torch.equal(bits, want_bits) and torch.equal(scales, want_scales)
    torch.testing.assert_close(sign_decode(bits, scales, 64) + residual, corrected, rtol=0.0, atol=1e-6)


def test_sign_encode_ef_into_scratch_keeps_the_old_residual(gen: torch.Generator) -> None:
    grad, residual = torch.randn(1, 64, generator=gen), torch.randn(1, 64, generator=gen)
    old, scratch = residual.clone(), torch.empty(64)
    sign_encode_ef(grad, residual, 32, residual_out=scratch)
    assert torch.equal(residual, old)
    torch.testing.assert_close(scratch.view(1, 64) + sign_decode(*sign_encode(grad + old, 32), 32), grad + old)


@pytest.mark.parametrize("summed", [False, True], ids=["row-by-row", "rows-summed"])
def test_decode_add_ops_equal_decode_then_add(summed: bool, gen: torch.Generator) -> None:
    rows, length, block = 3, 256, 64
    x = torch.randn(rows, length, generator=gen)
    start = torch.randn(length if summed else rows * length, generator=gen)

    def want(decoded: torch.Tensor) -> torch.Tensor:
        return start + 0.5 * (decoded.sum(dim=0) if summed else decoded.reshape(-1))

    bits, scales = sign_encode(x, block)
    out = sign_decode_add(bits, scales, block, start.clone(), alpha=0.5)
    torch.testing.assert_close(out, want(sign_decode(bits, scales, block)), rtol=1e-6, atol=1e-6)
    for nbits in (8, 4):
        codes, qscales = quantize_codes(x, nbits, block)
        q, _ = quantize_blockwise(x, nbits, block)
        assert torch.equal(codes, q.view(torch.uint8) if nbits == 8 else pack_int4(q))
        assert torch.equal(dequantize_codes(codes, qscales, nbits, block), dequantize_blockwise(q, qscales, block))
        out = dequantize_codes_add(codes, qscales, nbits, block, start.clone(), alpha=0.5)
        torch.testing.assert_close(out, want(dequantize_blockwise(q, qscales, block)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("summed", [False, True], ids=["row-by-row", "rows-summed"])
def test_decode_add_refs_in_column_pieces_equal_one_piece(summed: bool, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """The references walk their columns in cache-sized pieces: the result must not depend on the piece size."""
    from distcomp.kernels import _checks

    rows, length, block = 3, 4096, 64
    x = torch.randn(rows, length, generator=gen)
    start = torch.randn(length if summed else rows * length, generator=gen)
    # Strided payload rows, as the two-phase schedule passes them.
    bits, scales = sign_encode(x, block)
    payload = torch.cat([bits, scales.view(torch.uint8), torch.zeros(rows, 4, dtype=torch.uint8)], dim=1)
    pbits, pscales = payload[:, : length // 8], payload[:, length // 8 : -4].view(torch.float32)
    codes, qscales = quantize_codes(x, 4, block)
    results = []
    for piece in (_checks.CHUNK_VALUES, 3 * block * rows, 1):
        monkeypatch.setattr(_checks, "CHUNK_VALUES", piece)
        results.append((sign_decode_add(pbits, pscales, block, start.clone(), alpha=0.25),
                        dequantize_codes_add(codes, qscales, 4, block, start.clone(), alpha=0.25)))
    for got in results[1:]:
        assert torch.equal(got[0], results[0][0]) and torch.equal(got[1], results[0][1])


@pytest.mark.parametrize("block", [4, 12, 32, 40])
def test_fused_refs_in_tiny_pieces_match_whole_rows(block: int, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces of rows (blocks that do not fill whole bytes of bits too) give what whole rows give."""
    from distcomp.kernels import _checks

    length = block * 24
    x, r = torch.randn(3, length, generator=gen), torch.randn(3, length, generator=gen)
    want_bits, want_scales = sign_encode(x + r, block)
    monkeypatch.setattr(_checks, "CHUNK_VALUES", 3 * block)
    res = r.clone()
    bits, scales = sign_encode_ef(x, res, block)
    assert torch.equal(bits, want_bits)
    torch.testing.assert_close(scales, want_scales, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(sign_decode(bits, scales, block) + res, x + r, rtol=0.0, atol=1e-6)
    out = sign_decode_add(bits, scales, block, torch.zeros(length))
    torch.testing.assert_close(out, sign_decode(bits, scales, block).sum(dim=0), rtol=1e-6, atol=1e-6)
    if block % 2 == 0:
        qres = r.clone()
        codes, qscales = quantize_codes_ef(x, qres, 4, block)
        assert torch.equal(codes, quantize_codes(x + r, 4, block)[0])
        torch.testing.assert_close(dequantize_codes(codes, qscales, 4, block) + qres, x + r, rtol=0.0, atol=1e-6)


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bits", [8, 4], ids=["int8", "int4"])
def test_quantize_codes_ef_is_quantize_of_corrected_and_loses_nothing(
    bits: int, dtype: torch.dtype, stochastic: bool, gen: torch.Generator
) -> None:
    grad = torch.randn(3, 192, generator=gen).to(dtype)
    residual = torch.randn(3, 192, generator=gen) * 0.1
    corrected = grad.float() + residual
    rng = (lambda: torch.Generator().manual_seed(9)) if stochastic else (lambda: None)
    old = residual.clone()
    codes, scales = quantize_codes_ef(grad, residual, bits, 64, rng())
    want_codes, want_scales = quantize_codes(corrected, bits, 64, rng())
    assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)
    # input == decoded + new residual, to one rounding of the subtraction.
    torch.testing.assert_close(dequantize_codes(codes, scales, bits, 64) + residual, corrected, rtol=0.0, atol=1e-6)
    scratch = torch.empty(3 * 192)
    quantize_codes_ef(grad, old, bits, 64, rng(), residual_out=scratch)
    assert torch.equal(scratch.view(3, 192), residual) and not torch.equal(old, residual)


@pytest.mark.parametrize("bits", [8, 4], ids=["int8", "int4"])
def test_encode_ops_write_into_payload_columns(bits: int, gen: torch.Generator) -> None:
    x = torch.randn(2, 128, generator=gen)
    code_bytes = 128 * bits // 8
    payload = torch.full((2, code_bytes + 8 + 4), 0xA5, dtype=torch.uint8)
    out = (payload[:, :code_bytes], payload[:, code_bytes:-4].view(torch.float32))
    got = quantize_codes(x, bits, 64, out=out)
    assert got[0].data_ptr() == out[0].data_ptr()
    want = quantize_codes(x, bits, 64)
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
    spayload = torch.full((2, 16 + 8 + 4), 0xA5, dtype=torch.uint8)
    sout = (spayload[:, :16], spayload[:, 16:-4].view(torch.float32))
    sign_encode_ef(x, torch.zeros(2, 128), 64, out=sout)
    assert torch.equal(sout[0], sign_encode(x, 64)[0]) and torch.equal(sout[1], sign_encode(x, 64)[1])
    assert bool((payload[:, -4:] == 0xA5).all()) and bool((spayload[:, -4:] == 0xA5).all())


# -- backend selection ---------------------------------------------------------------------


def test_backend_is_reference_on_cpu_and_can_be_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    assert backend("cpu") == "reference"
    monkeypatch.setenv("DISTCOMP_KERNELS", "reference")
    assert backend_reason("cuda") == ("reference", "DISTCOMP_KERNELS=reference")
    monkeypatch.setenv("DISTCOMP_KERNELS", "fast")
    with pytest.raises(ValueError, match="DISTCOMP_KERNELS='fast': expected one of auto, reference, triton"):
        backend("cpu")
    monkeypatch.delenv("DISTCOMP_KERNELS")
    info = kernel_info()
    assert info["cpu"].startswith("reference (") and "sign_encode_ef" in info["ops"] and "_ref" not in info["ops"]


@pytest.mark.slow
def test_import_distcomp_without_triton() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"  # `import triton` now raises ImportError
        "import torch, distcomp, distcomp.kernels as k\n"
        "print(k.backend('cuda')); print(k.backend_reason('cuda')[1]); print(k.kernel_info()['triton'])\n"
        "print(k.pack_signs(torch.tensor([1.0, -1.0, 0.0])).tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "reference" and "triton is not installed" in lines[1]
    assert lines[2].startswith("unavailable (triton is not installed") and lines[3] == "[5]"


@pytest.mark.slow
def test_import_distcomp_does_not_import_triton() -> None:
    code = "import sys, torch, distcomp, distcomp.kernels as k; k.pack_signs(torch.ones(3)); print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: sign_encode_ef(torch.ones(1, 64), torch.ones(1, 64, dtype=torch.float16), 32), TypeError, "residual must be torch.float32"),
        (lambda: sign_encode_ef(torch.ones(1, 64), torch.ones(1, 32), 32), ValueError, "residual of the same shape"),
        (lambda: sign_encode_ef(torch.ones(2, 64), torch.ones(64, 2).t(), 32), ValueError, "residual must be contiguous"),
        (lambda: sign_encode_ef(torch.ones(1, 64), torch.ones(1, 64), 32, residual_out=torch.empty(63)), ValueError, "residual_out has 63"),
        (lambda: sign_decode_add(torch.zeros(2, 4, dtype=torch.uint8), torch.ones(2, 1), 32, torch.zeros(48)), ValueError,
         r"out has 48 values, expected 64 \(row by row\) or 32 \(summed\)"),
        (lambda: sign_decode_add(torch.zeros(1, 4, dtype=torch.uint8), torch.ones(1, 1), 32, torch.zeros(32, dtype=torch.float16)),
         ValueError, "out must be a contiguous float32"),
        (lambda: quantize_codes(torch.ones(1, 63), 8, 21), ValueError, r"last dimension \(21\).*block=2"),
        (lambda: dequantize_codes(torch.zeros(1, 32, dtype=torch.uint8), torch.ones(1, 1), 4, 32), ValueError, "32 bytes of 4-bit codes"),
        (lambda: dequantize_codes(torch.zeros(1, 16, dtype=torch.int8), torch.ones(1, 1), 4, 32), TypeError, "packed int4 codes must be torch.uint8"),
        (lambda: dequantize_codes_add(torch.zeros(1, 32, dtype=torch.uint8), torch.ones(1, 1), 8, 32, torch.zeros(31)), ValueError, "out has 31"),
        (lambda: quantize_codes_ef(torch.ones(1, 64), torch.ones(2, 32), 8, 32), ValueError, "the gradient's shape"),
        (lambda: quantize_codes_ef(torch.ones(1, 64), torch.ones(1, 64), 8, 32, residual_out=torch.empty(3)), ValueError,
         "residual_out has 3"),
        (lambda: sign_encode(torch.ones(2, 64), 32, out=(torch.empty(2, 4, dtype=torch.uint8), torch.empty(2, 2))), ValueError,
         r"out codes must be torch.uint8 of shape \(2, 8\)"),
        (lambda: quantize_codes(torch.ones(1, 64), 8, 32, out=(torch.empty(1, 64, dtype=torch.uint8), torch.empty(1, 2, dtype=torch.float64))),
         ValueError, "out scales must be torch.float32"),
        (lambda: quantize_codes(torch.ones(1, 64), 8, 32, out=(torch.empty(128, 1, dtype=torch.uint8)[::2].t(), torch.empty(1, 2))),
         ValueError, "out codes rows must be contiguous"),
        (lambda: sign_encode(torch.ones(1, 64), 32, out=torch.empty(1, 8, dtype=torch.uint8)), TypeError, r"a \(codes, scales\) pair"),
    ],
    ids=["ef-residual-dtype", "ef-shape", "ef-noncontiguous", "ef-out-size", "decode_add-out-size", "decode_add-out-dtype",
         "codes-odd-block", "codes-size", "codes-int4-dtype", "codes_add-out-size", "qef-residual-shape", "qef-out-size",
         "encode-out-shape", "encode-out-dtype", "encode-out-strided", "encode-out-pair"],
)
def test_fused_ops_reject_bad_input(call, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        call()
