"""The Triton kernels (``*_triton`` launchers) against their pure-torch references.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: this
module sets ``TRITON_INTERPRET=1`` before any kernel is defined (the flag is
read when ``@triton.jit`` runs). Launches use large tiles so that grids stay
small and the interpreter fast. The interpreter does not catch out-of-bounds
accesses, so inputs are views into buffers with sentinel padding, and outputs
are allocated inside padded buffers whose tails must come back untouched.

The interpreter skips the GPU compiler, so every kernel is also compiled
ahead of time for sm_90 (Triton ships ``ptxas``; no GPU needed).

Packing and indices are compared bit-exactly; floats with stated tolerances:
block scales (sum of ``|x|`` in another order) within ``rtol=1e-5``; decodes
that are one product (``sign * scale``, ``q * scale``) exactly; sums of rows
within ``rtol=1e-5, atol=1e-6``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"

pytest.importorskip("triton", reason="triton is not installed: pip install triton==3.7.1 (the distcomp[triton] extra)")

from distcomp.kernels import quant_triton, sign_triton, topk_triton  # noqa: E402
from distcomp.kernels.quant import (  # noqa: E402
    dequantize_blockwise_ref,
    dequantize_codes_add_ref,
    dequantize_codes_ref,
    pack_int4_ref,
    quantize_blockwise_ref,
    quantize_codes_ef_ref,
    quantize_codes_ref,
    unpack_int4_ref,
)
from distcomp.kernels.sign import (  # noqa: E402
    pack_signs_ref,
    sign_decode_add_ref,
    sign_decode_ref,
    sign_encode_ef_ref,
    sign_encode_ref,
    unpack_signs_ref,
)
from distcomp.kernels.topk import topk_pack_ref, topk_scatter_add_ref  # noqa: E402

if INTERPRET and not getattr(sign_triton._pack_signs_kernel, "__class__", type).__name__.startswith("Interpreted"):
    pytest.skip("the kernels were defined before TRITON_INTERPRET=1 was set: run this module in its own process",
                allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
PAD = 64
"""Sentinel elements after every input and output buffer."""
BIG = {"bytes_per_program": 32768}
"""Large tiles: a handful of programs even for a million values."""
SCALE_RTOL = 1e-5
QMAX = {8: 127, 4: 7}


# -- sentinel padding ----------------------------------------------------------------


def _sentinel(dtype: torch.dtype) -> float | int:
    """A value that stands out in data of ``dtype`` (and changes any result it leaks into)."""
    if dtype.is_floating_point:
        return 1e4 if dtype == torch.float16 else 1e30
    return {torch.uint8: 0xA5, torch.int8: 0x5A, torch.int16: 0x5A5A, torch.int32: 0x7FFF_FFF0, torch.int64: 2**40}[dtype]


def padded(x: torch.Tensor, fill: float | int | None = None) -> torch.Tensor:
    """A copy of ``x`` on the test device, followed in memory by ``PAD`` sentinel values."""
    fill = _sentinel(x.dtype) if fill is None else fill
    buf = torch.full((x.numel() + PAD,), fill, dtype=x.dtype, device=DEVICE)
    buf[: x.numel()] = x.reshape(-1).to(DEVICE)
    return buf[: x.numel()].view(x.shape)


def assert_tail_intact(t: torch.Tensor) -> None:
    """The sentinels after a :func:`padded` tensor that a kernel wrote into are untouched."""
    tail = t._base.view(-1)[t.numel() :]
    assert torch.equal(tail, torch.full_like(tail, _sentinel(t.dtype))), "a kernel wrote past its output"


@contextmanager
def padded_outputs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every ``torch.empty`` inside the block is followed by sentinels, checked on exit (store masks)."""
    real_empty, buffers = torch.empty, []

    def empty(*size: int | tuple[int, ...], dtype: torch.dtype | None = None, device=None, **kwargs) -> torch.Tensor:
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        dtype = dtype or torch.get_default_dtype()
        n = math.prod(shape)
        buf = real_empty(n + PAD, dtype=dtype, device=device, **kwargs).fill_(_sentinel(dtype))
        buffers.append((buf, n))
        return buf[:n].view(shape)

    with monkeypatch.context() as m:
        m.setattr(torch, "empty", empty)
        yield
    for buf, n in buffers:
        tail = buf[n:]
        assert torch.equal(tail, torch.full_like(tail, _sentinel(buf.dtype))), f"a kernel wrote past a {buf.dtype} output of {n}"


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0, zeros: bool = True) -> torch.Tensor:
    """Normal values with exact zeros and negative zeros sprinkled in (they pack as +1)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if zeros and x.numel():
        flat = x.view(-1)
        flat[::5] = 0.0
        flat[1::7] = -0.0
    return x


def cpu(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU, where the references run."""
    return t.cpu()


# -- sign packing --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1003, 1000003], ids=lambda n: f"n{n}")
def test_pack_unpack_signs_tri_vs_ref(n: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    x = randn(n, dtype=dtype)
    with padded_outputs(monkeypatch):
        tri = sign_triton.pack_signs_triton(padded(x, 1.0), **BIG)  # +1 past the end would set padding bits
    ref = pack_signs_ref(x)
    assert tri.dtype == torch.uint8 and torch.equal(cpu(tri), ref)
    with padded_outputs(monkeypatch):
        back = sign_triton.unpack_signs_triton(padded(ref, 0xFF), n, dtype, **BIG)
    assert back.dtype == dtype and torch.equal(cpu(back), unpack_signs_ref(ref, n, dtype))


def test_pack_signs_small_tiles_many_programs() -> None:
    x = randn(5000, seed=1)
    assert torch.equal(cpu(sign_triton.pack_signs_triton(padded(x), bytes_per_program=64)), pack_signs_ref(x))


# -- sign codec: encode, decode, decode-and-add, fused error feedback --------------------------

SIGN_SHAPES = [(0, 64, 32), (1, 32, 32), (3, 480, 96), (2, 4096, 2048), (2, 8192, 4096)]
SIGN_IDS = ["empty", "1x32b32", "3x480b96", "2x4096b2048", "2x8192b4096"]
SIGN_TILES = {"values_per_program": 8192, "max_tile": 8192}
TWO_PASS = {"values_per_program": 512, "max_tile": 512}
"""Blocks longer than ``max_tile`` take the tile loop (and the second pass of the fused kernel)."""


@pytest.mark.parametrize("tiles", [SIGN_TILES, TWO_PASS], ids=["one-tile", "tiled"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows,length,block", SIGN_SHAPES, ids=SIGN_IDS)
def test_sign_encode_tri_vs_ref(
    rows: int, length: int, block: int, dtype: torch.dtype, tiles: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    x = randn(rows, length, dtype=dtype)
    if rows:
        x[0, :block] = 0.0  # an all-zero block has scale 0
    with padded_outputs(monkeypatch):
        bits, scales = sign_triton.sign_encode_triton(padded(x), block, **tiles)
    ref_bits, ref_scales = sign_encode_ref(x, block)
    assert bits.shape == ref_bits.shape and torch.equal(cpu(bits), ref_bits)
    torch.testing.assert_close(cpu(scales), ref_scales, rtol=SCALE_RTOL, atol=0.0)


@pytest.mark.parametrize("rows,length,block", SIGN_SHAPES, ids=SIGN_IDS)
def test_sign_decode_tri_vs_ref_is_exact(rows: int, length: int, block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    bits, scales = sign_encode_ref(randn(rows, length), block)
    want = sign_decode_ref(bits, scales, block)
    with padded_outputs(monkeypatch):
        got = sign_triton.sign_decode_triton(padded(bits, 0xFF), padded(scales), block, bytes_per_program=1024)
    assert got.shape == want.shape and torch.equal(cpu(got), want)
    out = padded(torch.full((rows * length,), 7.0))
    res = sign_triton.sign_decode_triton(bits.to(DEVICE), scales.to(DEVICE), block, out=out, bytes_per_program=1024)
    assert res.data_ptr() == out.data_ptr() and torch.equal(cpu(out).view_as(want), want)
    assert_tail_intact(out)


def _payload_rows(*parts: torch.Tensor) -> torch.Tensor:
    """Byte rows ``[part 0 | part 1 | ... | 4 sentinel bytes]``, as a codec lays out a payload."""
    pieces = [p.contiguous().view(torch.uint8).view(p.shape[0], -1) for p in parts]
    tail = torch.full((parts[0].shape[0], 4), 0xA5, dtype=torch.uint8)
    return torch.cat([*pieces, tail], dim=1).to(DEVICE)


@pytest.mark.parametrize("summed", [False, True], ids=["row-by-row", "rows-summed"])
@pytest.mark.parametrize("rows,length,block", [(1, 32, 32), (4, 480, 96), (3, 4096, 2048)], ids=SIGN_IDS[1:4])
def test_sign_decode_add_tri_vs_ref_from_payload_views(rows: int, length: int, block: int, summed: bool) -> None:
    bits, scales = sign_encode_ref(randn(rows, length, seed=2), block)
    payload = _payload_rows(bits, scales)  # strided views, as the codec passes them
    pbits = payload[:, : length // 8]
    pscales = payload[:, length // 8 : -4].view(torch.float32)
    start = randn(length if summed else rows * length, seed=3, zeros=False)
    out = padded(start)
    sign_triton.sign_decode_triton(pbits, pscales, block, out=out, accumulate=True, alpha=0.25, bytes_per_program=1024)
    assert_tail_intact(out)
    want = sign_decode_add_ref(bits, scales, block, start.clone(), alpha=0.25)
    torch.testing.assert_close(cpu(out), want, rtol=1e-5, atol=1e-6)
    if not summed:  # one product and one add: the same rounding as decode, then add
        assert torch.equal(cpu(out), start + 0.25 * sign_decode_ref(bits, scales, block).view(-1))


@pytest.mark.parametrize("tiles", [SIGN_TILES, TWO_PASS], ids=["one-pass", "two-pass"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows,length,block", SIGN_SHAPES, ids=SIGN_IDS)
def test_sign_encode_ef_tri_vs_ref(
    rows: int, length: int, block: int, dtype: torch.dtype, tiles: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    grad = randn(rows, length, dtype=dtype, seed=4)
    residual = randn(rows, length, seed=5, zeros=False) * 0.3
    corrected = grad.float() + residual
    res = padded(residual)
    with padded_outputs(monkeypatch):
        bits, scales = sign_triton.sign_encode_ef_triton(padded(grad), res, block, **tiles)
    assert_tail_intact(res)
    want_bits, want_scales = sign_encode_ref(corrected, block)
    assert torch.equal(cpu(bits), want_bits)
    torch.testing.assert_close(cpu(scales), want_scales, rtol=SCALE_RTOL, atol=0.0)
    # Error feedback loses nothing: decode(bits, scales) + residual == corrected.
    decoded = sign_decode_ref(cpu(bits), cpu(scales), block)
    torch.testing.assert_close(decoded + cpu(res), corrected, rtol=0.0, atol=1e-6)
    ref_res = residual.clone()
    sign_encode_ef_ref(grad, ref_res, block)
    # The residuals differ by the scales' difference: within SCALE_RTOL of the largest scale.
    atol = SCALE_RTOL * float(want_scales.max()) if rows else 0.0
    torch.testing.assert_close(cpu(res), ref_res, rtol=0.0, atol=atol)


def test_sign_encode_ef_into_separate_residual_keeps_the_old_one() -> None:
    grad, residual = randn(2, 256, seed=6), randn(2, 256, seed=7)
    res_in, res_out = padded(residual), padded(torch.zeros(2, 256))
    sign_triton.sign_encode_ef_triton(padded(grad), res_in, 64, residual_out=res_out, **SIGN_TILES)
    assert torch.equal(cpu(res_in), residual)
    want = residual.clone()
    sign_encode_ef_ref(grad, want, 64)
    torch.testing.assert_close(cpu(res_out), want, rtol=0.0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_sign_encode_ef_nonfinite_shows_in_scales() -> None:
    grad = randn(1, 128, seed=8)
    grad[0, 70] = float("inf")
    _, scales = sign_triton.sign_encode_ef_triton(padded(grad), padded(torch.zeros(1, 128)), 64, **SIGN_TILES)
    assert torch.isfinite(cpu(scales)).tolist() == [[True, False]]


def _payload_buffer(rows: int, code_bytes: int, nscales: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Sentinel-filled payload rows ``[codes | scales | 4 bytes]`` and the ``(codes, scales)`` views a codec encodes into."""
    payload = torch.full((rows, code_bytes + 4 * nscales + 4), 0xA5, dtype=torch.uint8, device=DEVICE)
    return payload, (payload[:, :code_bytes], payload[:, code_bytes : code_bytes + 4 * nscales].view(torch.float32))


def _assert_health_intact(payload: torch.Tensor) -> None:
    assert bool((payload[:, -4:] == 0xA5).all()), "an encode wrote past its payload columns"


@pytest.mark.parametrize("ef", [False, True], ids=["encode", "encode_ef"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows,length,block", SIGN_SHAPES[:4], ids=SIGN_IDS[:4])
def test_sign_encode_into_payload_views_tri_vs_ref(rows: int, length: int, block: int, dtype: torch.dtype, ef: bool) -> None:
    grad = randn(rows, length, dtype=dtype, seed=41)
    residual = randn(rows, length, seed=42, zeros=False) * 0.3
    payload, out = _payload_buffer(rows, length // 8, length // block)
    res_out = padded(torch.zeros(rows, length))
    if ef:
        got = sign_triton.sign_encode_ef_triton(padded(grad), padded(residual), block, res_out, out=out, **SIGN_TILES)
        want_bits, want_scales = sign_encode_ref(grad.float() + residual, block)
    else:
        got = sign_triton.sign_encode_triton(padded(grad), block, out=out, **SIGN_TILES)
        want_bits, want_scales = sign_encode_ref(grad, block)
    assert got[0].data_ptr() == out[0].data_ptr() and got[1].data_ptr() == out[1].data_ptr()
    _assert_health_intact(payload)
    assert torch.equal(cpu(out[0]), want_bits)
    torch.testing.assert_close(cpu(out[1]), want_scales, rtol=SCALE_RTOL, atol=0.0)
    if ef:
        assert_tail_intact(res_out)
        decoded = sign_decode_ref(cpu(out[0]), cpu(out[1]).contiguous(), block)
        torch.testing.assert_close(decoded + cpu(res_out), grad.float() + residual, rtol=0.0, atol=1e-6)


# -- block-wise quantization -------------------------------------------------------------------

QUANT_SHAPES = [(0, 64, 32), (1, 32, 32), (3, 480, 96), (2, 4096, 2048)]
QUANT_IDS = ["empty", "1x32b32", "3x480b96", "2x4096b2048"]
QUANT_TILES = {"values_per_program": 8192, "max_tile": 8192}
QUANT_TWO_PASS = {"values_per_program": 512, "max_tile": 512}


def _ties(rows: int, length: int, block: int, dtype: torch.dtype) -> torch.Tensor:
    """Values at exact half steps (x.5 of a step, both signs), to check round-half-to-even."""
    gen = torch.Generator().manual_seed(9)
    x = (torch.randint(-20, 20, (rows, length), generator=gen) + 0.5) / 32
    x = torch.where(torch.rand(rows, length, generator=gen) < 0.5, x, torch.randn(rows, length, generator=gen))
    if rows:
        x[:, ::block] = 127 / 32  # absmax 127/32: scale 1/32 at 8 bits, so x.5 / 32 is an exact tie
        x[0, block // 2] = 0.49999997  # just below a half step: floor(v + 0.5) rounds it the wrong way
    return x.to(dtype)


@pytest.mark.parametrize("tiles", [QUANT_TILES, QUANT_TWO_PASS], ids=["one-pass", "two-pass"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bits", [8, 4], ids=["int8", "int4"])
@pytest.mark.parametrize("rows,length,block", QUANT_SHAPES, ids=QUANT_IDS)
def test_quantize_nearest_tri_vs_ref_is_bit_exact(
    rows: int, length: int, block: int, bits: int, dtype: torch.dtype, tiles: dict[str, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    x = _ties(rows, length, block, dtype)
    want_q, want_scales = quantize_blockwise_ref(x, bits, block)
    with padded_outputs(monkeypatch):
        q, scales = quant_triton.quantize_blockwise_triton(padded(x), bits, block, **tiles)
        codes, scales2 = quant_triton.quantize_blockwise_triton(padded(x), bits, block, packed=True, **tiles)
    assert torch.equal(cpu(scales), want_scales) and torch.equal(cpu(scales2), want_scales)
    assert q.dtype == torch.int8 and torch.equal(cpu(q), want_q)
    want_codes, _ = quantize_codes_ref(x, bits, block)
    assert codes.dtype == torch.uint8 and torch.equal(cpu(codes), want_codes)


def test_quantize_tiny_blocks_match_the_reference() -> None:
    # absmax / qmax is subnormal: division (not a reciprocal) keeps the codes exact.
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(10)) * 1e-39
    for bits in (8, 4):
        q, scales = quant_triton.quantize_blockwise_triton(padded(x), bits, 32, **QUANT_TILES)
        want_q, want_scales = quantize_blockwise_ref(x, bits, 32)
        assert torch.equal(cpu(q), want_q) and torch.equal(cpu(scales), want_scales)


@pytest.mark.slow  # many interpreted launches
@pytest.mark.parametrize("bits", [8, 4], ids=["int8", "int4"])
def test_stochastic_rounding_is_seeded_bounded_and_unbiased(bits: int) -> None:
    block, draws = 32, 4000
    x = torch.randn(1, 2 * block, generator=torch.Generator().manual_seed(11))
    xs = padded(x.expand(draws, -1).contiguous())
    q, scales = quant_triton.quantize_blockwise_triton(xs, bits, block, torch.Generator().manual_seed(7), **QUANT_TILES)
    again, _ = quant_triton.quantize_blockwise_triton(xs, bits, block, torch.Generator().manual_seed(7), **QUANT_TILES)
    other, _ = quant_triton.quantize_blockwise_triton(xs, bits, block, torch.Generator().manual_seed(8), **QUANT_TILES)
    assert torch.equal(q, again), "the same seed must give the same codes"
    assert not torch.equal(q, other)
    q, scales = cpu(q), cpu(scales)
    assert torch.equal(scales, quantize_blockwise_ref(x, bits, block)[1].expand(draws, -1))
    deq = dequantize_blockwise_ref(q, scales, block)
    step = scales[0].repeat_interleave(block)
    err = (deq - x) / step
    assert float(err.abs().max()) < 1.0 + 1e-5, "stochastic rounding moves a value by less than one step"
    assert float(err.abs().max()) > 0.5
    # The mean of 4000 draws is within 0.03 step of the value (4 sigma); nearest rounding is off by up to 0.5.
    bias = err.mean(dim=0)
    worst = int(bias.abs().argmax())
    assert float(bias.abs().max()) < 0.04, f"element {worst} is biased by {float(bias[worst]):+.3f} of a step"


@pytest.mark.slow  # many interpreted launches
def test_stochastic_rounding_generator_advances_and_rounds_up_at_the_right_rate() -> None:
    # 0.1 step above a code must round up 10% of the time; two calls on one generator differ.
    x = torch.full((8192, 32), 12.1 / 127)
    x[:, 31] = 1.0
    gen = torch.Generator().manual_seed(3)
    q1, _ = quant_triton.quantize_blockwise_triton(padded(x), 8, 32, gen, **QUANT_TILES)
    q2, _ = quant_triton.quantize_blockwise_triton(padded(x), 8, 32, gen, **QUANT_TILES)
    assert not torch.equal(q1, q2)
    up = (cpu(q1)[:, :31] == 13).float().mean()
    assert abs(float(up) - 0.1) < 0.01, f"rounded up {float(up):.3f} of the time, expected 0.100"
    assert set(cpu(q1)[:, :31].unique().tolist()) == {12, 13}


@pytest.mark.parametrize("tiles", [QUANT_TILES, QUANT_TWO_PASS], ids=["one-pass", "two-pass"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bits", [8, 4], ids=["int8", "int4"])
@pytest.mark.parametrize("rows,length,block", QUANT_SHAPES, ids=QUANT_IDS)
def test_quantize_codes_ef_nearest_tri_vs_ref(
    rows: int, length: int, block: int, bits: int, dtype: torch.dtype, tiles: dict[str, int]
) -> None:
    """Codes and scales bit for bit; the residual ``x - q * scale`` exactly in the interpreter.

    On a GPU the compiler may contract the product and the subtraction into one
    FMA, which rounds once instead of twice: the residual then differs by at
    most half an ulp of ``q * scale`` (covered by ``atol`` below).
    """
    grad = _ties(rows, length, block, dtype)
    residual = (randn(rows, length, seed=43, zeros=False) * 0.01).float()
    payload, out = _payload_buffer(rows, length * bits // 8, length // block)
    res_in, res_out = padded(residual), padded(torch.zeros(rows, length))
    quant_triton.quantize_blockwise_triton(
        padded(grad), bits, block, packed=True, out=out, residual=res_in, residual_out=res_out, **tiles
    )
    _assert_health_intact(payload)
    assert_tail_intact(res_out)
    assert torch.equal(cpu(res_in), residual), "a separate residual_out leaves the old residual untouched"
    want_res = residual.clone()
    want_codes, want_scales = quantize_codes_ef_ref(grad, want_res, bits, block)
    assert torch.equal(cpu(out[0]), want_codes) and torch.equal(cpu(out[1]), want_scales)
    if INTERPRET:
        assert torch.equal(cpu(res_out), want_res)
    else:
        torch.testing.assert_close(cpu(res_out), want_res, rtol=0.0, atol=float(want_scales.abs().max(initial=0)) * 2**-16)


@pytest.mark.parametrize("bits", [8, 4], ids=["int8", "int4"])
def test_quantize_codes_ef_stochastic_loses_nothing_and_is_seeded(bits: int) -> None:
    grad, residual = randn(3, 4096, dtype=torch.bfloat16, seed=44), randn(3, 4096, seed=45, zeros=False) * 0.1
    outs = []
    for seed in (7, 7, 8):
        payload, out = _payload_buffer(3, 4096 * bits // 8, 4096 // 64)
        res = padded(residual)
        quant_triton.quantize_blockwise_triton(
            padded(grad), bits, 64, torch.Generator().manual_seed(seed), packed=True, out=out, residual=res, **QUANT_TILES
        )
        _assert_health_intact(payload)
        decoded = dequantize_codes_ref(cpu(out[0]).contiguous(), cpu(out[1]).contiguous(), bits, 64)
        torch.testing.assert_close(decoded + cpu(res), grad.float() + residual, rtol=0.0, atol=1e-6)
        outs.append(cpu(payload))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning", "ignore:All-NaN slice:RuntimeWarning")
@pytest.mark.parametrize("ef", [False, True], ids=["quantize", "quantize_ef"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_quantize_nonfinite_shows_in_scales(bad: float, ef: bool) -> None:
    # tl.max need not propagate NaN: the kernel must still mark the block, as the reference's amax does.
    x = randn(1, 128, seed=46)
    x[0, 70] = bad
    kwargs = {"residual": padded(torch.zeros(1, 128))} if ef else {}
    for tiles in (QUANT_TILES, {"values_per_program": 32, "max_tile": 32}):
        _, scales = quant_triton.quantize_blockwise_triton(padded(x), 8, 64, packed=True, **kwargs, **tiles)
        assert torch.isfinite(cpu(scales)).tolist() == [[True, False]]
    assert torch.isfinite(quantize_codes_ref(x, 8, 64)[1]).tolist() == [[True, False]]


@pytest.mark.parametrize("summed", [None, False, True], ids=["decode", "add-row-by-row", "add-rows-summed"])
@pytest.mark.parametrize("bits", [8, 4], ids=["int8", "int4"])
@pytest.mark.parametrize("rows,length,block", [(1, 32, 32), (4, 480, 96), (3, 4096, 2048)], ids=QUANT_IDS[1:])
def test_dequantize_tri_vs_ref_from_payload_views(rows: int, length: int, block: int, bits: int, summed: bool | None) -> None:
    x = randn(rows, length, seed=12)
    codes, scales = quantize_codes_ref(x, bits, block, torch.Generator().manual_seed(1))
    payload = _payload_rows(codes, scales)
    ncode = length * bits // 8
    pcodes, pscales = payload[:, :ncode], payload[:, ncode:-4].view(torch.float32)
    want = dequantize_blockwise_ref(quantize_blockwise_ref(x, bits, block, torch.Generator().manual_seed(1))[0], scales, block)
    if summed is None:
        got = quant_triton.dequantize_blockwise_triton(pcodes, pscales, block, bits=bits, pairs_per_program=1024)
        assert torch.equal(cpu(got), want)
        return
    start = randn(length if summed else rows * length, seed=13, zeros=False)
    out = padded(start)
    quant_triton.dequantize_blockwise_triton(
        pcodes, pscales, block, out=out, bits=bits, accumulate=True, alpha=0.5, pairs_per_program=1024
    )
    assert_tail_intact(out)
    torch.testing.assert_close(cpu(out), dequantize_codes_add_ref(codes, scales, bits, block, start.clone(), 0.5),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(0,), (2,), (3, 10), (2, 3, 4), (1, 200002)], ids=["empty", "1d", "2d", "3d", "long"])
def test_pack_unpack_int4_tri_vs_ref(shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    q = torch.randint(-8, 8, shape, generator=torch.Generator().manual_seed(14), dtype=torch.int8)
    with padded_outputs(monkeypatch):
        packed = quant_triton.pack_int4_triton(padded(q), pairs_per_program=65536)
        back = quant_triton.unpack_int4_triton(padded(pack_int4_ref(q)), pairs_per_program=65536)
    assert packed.shape == (*shape[:-1], shape[-1] // 2) and torch.equal(cpu(packed), pack_int4_ref(q))
    assert torch.equal(cpu(back), unpack_int4_ref(pack_int4_ref(q)))


# -- top-k -----------------------------------------------------------------------------------


def _split(payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values fp32, indices int64)`` of a top-k payload."""
    k = payload.numel() // 2
    return payload[:k].view(torch.float32), payload[k:].to(torch.int64)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "n,k", [(1, 1), (10, 0), (10, 10), (1003, 37), (300001, 1000), (300001, 30000), (0, 0)],
    ids=["n1k1", "k0", "k_eq_n", "n1003k37", "select-path", "dense-fallback", "empty"],
)
def test_topk_pack_tri_vs_ref(n: int, k: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    x = randn(n, dtype=dtype, seed=15, zeros=False)
    with padded_outputs(monkeypatch):
        payload = topk_triton.topk_pack_triton(padded(x), k, block=4096, select_block=65536)
    assert payload.dtype == torch.int32 and payload.shape == (2 * k,)
    values, indices = _split(cpu(payload))
    _, want_indices = _split(topk_pack_ref(x, k))
    if dtype == torch.float32:  # half precision has ties at the k-th magnitude
        assert torch.equal(indices.sort().values, want_indices.sort().values)
    assert indices.unique().numel() == k
    assert torch.equal(values, x[indices].float())
    assert torch.equal(values.abs().sort().values, x.float().abs().topk(k).values.sort().values)


def test_topk_pack_select_path_is_deterministic_and_falls_back_on_ties() -> None:
    x = randn(300001, seed=16, zeros=False)
    a = topk_triton.topk_pack_triton(padded(x), 1000, select_block=65536)
    b = topk_triton.topk_pack_triton(padded(x), 1000, select_block=16384)
    assert torch.equal(a, b), "the payload must not depend on the order programs ran in"
    ties = torch.randint(-3, 4, (300001,), generator=torch.Generator().manual_seed(17)).float()
    values, indices = _split(cpu(topk_triton.topk_pack_triton(padded(ties), 500, select_block=65536)))
    assert indices.unique().numel() == 500 and bool((values.abs() == 3).all())


@pytest.mark.parametrize("rows,n,k", [(1, 10, 0), (1, 50, 8), (4, 1000, 100), (3, 100003, 5000)], ids=["k0", "1row", "4rows", "3rows-big"])
def test_topk_scatter_add_tri_vs_ref(rows: int, n: int, k: int) -> None:
    xs = [randn(n, seed=20 + r, zeros=False) for r in range(rows)]
    if rows > 1:
        xs[1][:k] = 100.0  # rows 0 and 1 share indices: duplicates must add up
        xs[0][:k] = -50.0
    payloads = torch.stack([topk_pack_ref(x, k) for x in xs])
    # Gathered rows carry a health word after each payload, as in sparse_mean: strided rows.
    gathered = torch.cat([payloads, torch.full((rows, 1), 0x7FFF_FFF0, dtype=torch.int32)], dim=1).to(DEVICE)
    start = randn(n, seed=30, zeros=False)
    out = padded(start)
    res = topk_triton.topk_scatter_add_triton(out, gathered[:, :-1], block=4096)
    assert res is out
    assert_tail_intact(out)
    torch.testing.assert_close(cpu(out), topk_scatter_add_ref(start.clone(), payloads), rtol=1e-6, atol=1e-5)
    if rows > 1:  # an index past the end (a corrupt payload) is dropped, never written
        bad = gathered.clone()
        bad[0, k] = n + 3
        before = cpu(out).clone()
        topk_triton.topk_scatter_add_triton(out, bad[:1, :-1], block=4096)
        assert_tail_intact(out)
        assert float((cpu(out) - before).abs().sum()) > 0


# -- launch parameters and public dispatch ------------------------------------------------------


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: sign_triton.pack_signs_triton(torch.ones(16, device=DEVICE), bytes_per_program=100), "bytes_per_program=100 must be a power of two"),
        (lambda: sign_triton.pack_signs_triton(torch.ones(4, 4, device=DEVICE).t()), "x must be contiguous"),
        (lambda: sign_triton.sign_encode_triton(torch.ones(1, 64, device=DEVICE), 32, max_tile=4), "max_tile=4"),
        (lambda: quant_triton.quantize_blockwise_triton(torch.ones(1, 64, device=DEVICE), 8, 32, values_per_program=3), "values_per_program=3"),
        (lambda: quant_triton.quantize_blockwise_triton(torch.ones(1, 63, device=DEVICE), 8, 21), "block=21 must be even"),
        (lambda: sign_triton.sign_decode_triton(torch.zeros(2, 4, dtype=torch.uint8, device=DEVICE), torch.ones(2, 1, device=DEVICE), 32,
                                                out=torch.empty(100, device=DEVICE)), "out has 100 values, expected 64"),
        (lambda: topk_triton.topk_scatter_add_triton(torch.zeros(4, 2, device=DEVICE).t(), torch.zeros(1, 2, dtype=torch.int32, device=DEVICE)),
         "out must be contiguous"),
    ],
    ids=["pow2", "noncontiguous", "max_tile", "values_per_program", "odd-block", "decode-out", "scatter-out"],
)
def test_launchers_validate_their_parameters(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.skipif(not INTERPRET, reason="checks the CPU interpreter route; on CUDA the public ops use Triton anyway")
def test_public_ops_route_to_triton_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from distcomp import kernels
    from distcomp.codecs import IntCodec
    from distcomp.codecs import SignCodec

    assert kernels.backend("cpu") == "reference"
    calls: list[str] = []
    for module in (sign_triton, quant_triton, topk_triton):
        for name in [n for n in vars(module) if n.endswith("_triton") and not n.startswith("_")]:
            real = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **kw: (calls.append(_name), _real(*a, **kw))[1])
    monkeypatch.setenv("DISTCOMP_KERNELS", "triton")
    assert kernels.backend("cpu") == "triton"
    rows = randn(2, 256, seed=40).t().contiguous().t()  # non-contiguous input is copied, not refused
    for codec in (SignCodec(64), IntCodec(8, 64, None), IntCodec(4, 64, torch.Generator().manual_seed(0))):
        payload = torch.empty(2, codec.payload_bytes(256), dtype=torch.uint8)
        codec.encode(rows, payload)
        decoded = codec.decode(payload, 256)
        summed = codec.decode_add(payload, 256, torch.zeros(256), alpha=0.5)
        monkeypatch.setenv("DISTCOMP_KERNELS", "reference")
        assert torch.equal(decoded, codec.decode(payload, 256))
        torch.testing.assert_close(summed, 0.5 * decoded.sum(dim=0), rtol=1e-6, atol=1e-6)
        monkeypatch.setenv("DISTCOMP_KERNELS", "triton")
        residual = torch.zeros(2, 256)
        codec.encode_ef(rows, residual, None, payload)
        torch.testing.assert_close(codec.decode(payload, 256) + residual, rows, rtol=0, atol=1e-6)  # nothing lost
    payload = kernels.topk_pack(rows, 10)
    out = kernels.topk_scatter_add(torch.zeros(512), payload.view(1, -1))
    assert torch.equal(out, kernels.topk_scatter_add_ref(torch.zeros(512), payload.view(1, -1)))
    assert {"sign_encode_triton", "sign_encode_ef_triton", "sign_decode_triton", "quantize_blockwise_triton",
            "dequantize_blockwise_triton", "topk_pack_triton", "topk_scatter_add_triton"} <= set(calls)


@pytest.mark.slow  # Triton's compiler in a fresh interpreter, every launch specialization
def test_every_kernel_compiles_for_a_gpu() -> None:
    # The interpreter skips the compiler; compile each launch specialization to a cubin for sm_90.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "distcomp.kernels._compile_check", "--arch", "90"],
                         capture_output=True, text=True, env=env, timeout=590)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "kernel variants compile for sm_90" in out.stdout
