"""FSDP2 worker residuals held as int8 blocks (``error_feedback="int8"``), in one process."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distcomp.errors import CheckpointError
from distcomp.fsdp.modules import ParamSlot
from distcomp.fsdp.register import EF_MODES, _make_compressor
from distcomp.fsdp.residuals import BLOCK, QuantizedRows, dequantize_unit, quantize_unit
from distcomp.fsdp.state import FSDPCompressionState, Unit

CPU = torch.device("cpu")
WORLD = 2
# Two parameters with odd padded shards: neither fills a whole block.
SLOTS = (ParamSlot("a.weight", 0, 300), ParamSlot("a.bias", 300, 5))
UNIT = Unit("a", SLOTS)


def _rows(numel: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(WORLD, numel, generator=torch.Generator().manual_seed(seed))


def _state(mode: str) -> FSDPCompressionState:
    comp = _make_compressor("int8", {"start_step": 0})
    return FSDPCompressionState(
        nn.Linear(1, 1),
        comp,
        [UNIT],
        error_feedback=mode,  # type: ignore[arg-type]
        world_size=WORLD,
        rank=0,
    )


def _step(state: FSDPCompressionState, residual: torch.Tensor) -> None:
    """One step whose only unit leaves ``residual`` (as the reduce-scatter does: only with feedback)."""
    state.begin_call("a")
    if state.residual("a", WORLD, residual.shape[1], CPU) is not None:
        state.stage("a", residual)
    state.flush()


@pytest.mark.parametrize("numel", [1, 5, BLOCK - 1, BLOCK, BLOCK + 1, 300, 4 * BLOCK])
def test_round_trip_error_is_at_most_half_a_step(numel: int) -> None:
    x = _rows(numel, seed=numel) * torch.logspace(-3, 3, numel)  # blocks of very different magnitudes
    q = QuantizedRows.quantize(x)
    blocks = -(-numel // BLOCK)
    assert q.codes.dtype == torch.int8 and q.codes.shape == (WORLD, blocks * BLOCK)
    assert q.scales.dtype == torch.float32 and q.scales.shape == (WORLD, blocks)
    back = q.dequantize()
    assert back.shape == (WORLD, numel) and back.dtype == torch.float32
    padded = torch.nn.functional.pad(x, (0, blocks * BLOCK - numel)).view(WORLD, blocks, BLOCK)
    absmax = padded.abs().amax(dim=-1, keepdim=True)
    err = (torch.nn.functional.pad(back - x, (0, blocks * BLOCK - numel))).view(WORLD, blocks, BLOCK).abs()
    # Round to nearest: at most half of a step absmax / 127 (plus fp32 rounding of the scale).
    assert bool((err <= absmax / 254 * (1 + 1e-5)).all())
    # The padding is quantized to zero codes: it takes no part in what comes back.
    assert bool((q.codes[:, numel:] == 0).all())


def test_rounding_is_deterministic() -> None:
    x = _rows(300)
    first, second = QuantizedRows.quantize(x), QuantizedRows.quantize(x)
    assert torch.equal(first.codes, second.codes) and torch.equal(first.scales, second.scales)


def test_stochastic_rounding_is_unbiased_and_within_one_step() -> None:
    x = (_rows(BLOCK) * 1e-3).clamp(-3e-3, 3e-3)
    x[:, 0] = 1.0  # one large value: the rest of the block lies below half a step (1/254)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([QuantizedRows.quantize(x, gen).dequantize() for _ in range(400)])
    step = 1.0 / 127
    assert float((draws - x).abs().max()) <= step * (1 + 1e-5)
    # Rounding to nearest would drop the small values; the mean of stochastic draws keeps them.
    assert float((draws.mean(0) - x).abs().max()) <= 0.2 * step
    assert float((QuantizedRows.quantize(x).dequantize()[:, 1:]).abs().max()) == 0.0


def test_zero_blocks_come_back_exactly_zero() -> None:
    x = torch.zeros(WORLD, 3 * BLOCK)
    x[0, BLOCK : 2 * BLOCK] = torch.linspace(-1, 1, BLOCK)  # one live block among zero ones
    q = QuantizedRows.quantize(x)
    assert q.scales[0, 0] == 0 and q.scales[0, 2] == 0 and bool((q.scales[1] == 0).all())
    back = q.dequantize()
    assert torch.equal(back[1], torch.zeros(3 * BLOCK))
    assert torch.equal(back[0, :BLOCK], torch.zeros(BLOCK)) and torch.equal(back[0, 2 * BLOCK :], torch.zeros(BLOCK))
    assert float((back[0, BLOCK : 2 * BLOCK] - x[0, BLOCK : 2 * BLOCK]).abs().max()) <= 1 / 254 + 1e-6


def test_unit_round_trip_keeps_each_parameter_apart() -> None:
    # Parameters of very different scales: per-parameter blocks keep the small one precise.
    x = torch.cat([_rows(300) * 1e3, _rows(5, seed=1) * 1e-3], dim=1)
    parts = quantize_unit(x, SLOTS)
    assert [p.numel for p in parts] == [300, 5]
    back = dequantize_unit(parts, SLOTS, WORLD, CPU)
    assert back.shape == x.shape
    small = x[:, 300:]
    assert float((back[:, 300:] - small).abs().max()) <= float(small.abs().max()) / 254 * (1 + 1e-5)


def test_ef_bytes_are_the_bytes_held() -> None:
    per_mode = {}
    for mode in EF_MODES:
        state = _state(mode)
        assert state.ef_bytes() == 0, "nothing is held before the first step"
        _step(state, _rows(305))
        per_mode[mode] = state.ef_bytes()
    # int8: each parameter's rows padded to whole blocks, one byte per code and four per block scale.
    blocks = -(-300 // BLOCK) + -(-5 // BLOCK)
    assert per_mode["int8"] == WORLD * blocks * (BLOCK + 4)
    assert per_mode["fp32"] == WORLD * 305 * 4 and per_mode["bf16"] == WORLD * 305 * 2 and per_mode["none"] == 0
    assert _state("int8").stats()["ef_bytes"] == 0


def test_residual_comes_back_as_fp32_within_the_quantization_error() -> None:
    state = _state("int8")
    x = _rows(305)
    _step(state, x)
    got = state.residual("a", WORLD, 305, CPU)
    assert got is not None and got.dtype == torch.float32 and got.shape == (WORLD, 305)
    # Stochastic rounding: at most one step absmax / 127 (the whole unit's absmax bounds every block's).
    assert float((got - x).abs().max()) <= float(x.abs().max()) / 127 * (1 + 1e-5)


def test_int8_state_dict_holds_the_codes_exactly_and_resumes_bit_identically() -> None:
    state = _state("int8")
    _step(state, _rows(305))
    saved = state.state_dict()
    assert set(saved["residuals"]) == {"a.weight", "a.bias"}, "keyed by parameter names"
    entry = saved["residuals"]["a.weight"]
    assert set(entry) == {"codes", "scales"} and entry["codes"].dtype == torch.int8
    resumed = _state("int8")
    resumed.load_state_dict(saved)
    assert resumed.ef_bytes() == state.ef_bytes()
    assert torch.equal(resumed.residual("a", WORLD, 305, CPU), state.residual("a", WORLD, 305, CPU))
    again = resumed.state_dict()["residuals"]
    for name, part in saved["residuals"].items():
        assert torch.equal(again[name]["codes"], part["codes"]) and torch.equal(again[name]["scales"], part["scales"])
    # The rounding generator resumes too: the next step rounds the same residual to the same codes.
    nxt = _rows(305, seed=7)
    _step(state, nxt)
    _step(resumed, nxt)
    for name, part in state.state_dict()["residuals"].items():
        assert torch.equal(resumed.state_dict()["residuals"][name]["codes"], part["codes"]), name


def test_dense_state_dict_format_is_unchanged() -> None:
    state = _state("fp32")
    x = _rows(305)
    _step(state, x)
    saved = state.state_dict()
    assert "residual_generator" not in saved
    residuals = saved["residuals"]
    assert torch.equal(residuals["a.weight"], x[:, :300]) and torch.equal(residuals["a.bias"], x[:, 300:])


def test_load_refuses_another_mode_and_bad_entries() -> None:
    state = _state("int8")
    _step(state, _rows(305))
    saved = state.state_dict()
    with pytest.raises(CheckpointError, match="error_feedback"):
        _state("fp32").load_state_dict(saved)
    bad = {**saved, "residuals": {**saved["residuals"], "a.bias": {"codes": torch.zeros(WORLD, 5, dtype=torch.int8)}}}
    with pytest.raises(CheckpointError, match="a.bias"):
        _state("int8").load_state_dict(bad)
    dense = {**saved, "residuals": {"a.weight": torch.zeros(WORLD, 300), "a.bias": torch.zeros(WORLD, 5)}}
    with pytest.raises(CheckpointError):
        _state("int8").load_state_dict(dense)
