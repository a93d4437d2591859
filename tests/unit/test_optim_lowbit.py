"""Optimizer state in low precision (``state_dtype``): the quantizers, training, resume and refusals.

The quantizers' bounds are checked value by value; training compares the loss
of a short run against the same run with fp32 state (tolerances below, per
``state_dtype``), in one process and on 2 ranks over gloo.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from optim_tasks import OPTIMIZERS, batch, digest, loss_of, make_model
from torch.nn.parallel import DistributedDataParallel as DDP

import distcomp.optim as optim
from distcomp.errors import CheckpointError, ConfigError
from distcomp.optim import lowbit
from distcomp.optim.lowbit import BLOCK, QuantizedBuffer
from distcomp.testing import run_ranks

ALGORITHMS = list(OPTIMIZERS)
LOWBIT = ("bf16", "int8", "int4")
OPTIONS = {
    "OneBitAdam": {"lr": 0.01, "freeze_step": 10, "weight_decay": 0.01},
    "ZeroOneAdam": {
        "lr": 0.01,
        "var_freeze_step": 10,
        "var_update_scaler": 2,
        "local_step_scaler": 10,
        "local_step_clipper": 4,
        "weight_decay": 0.01,
    },
    "OneBitLamb": {"lr": 0.01, "freeze_step": 10, "weight_decay": 0.01, "coeff_beta": 0.5},
}
# Held-out loss after STEPS steps may exceed fp32 state's by at most this fraction (lower is fine; it differs
# both ways). Measured, single process / 2 ranks: bf16 +0.0 / +0.2 %, int8 +0.0 / -0.1 %, int4 +2.7 / +4.0 %
# (the largest of the three optimizers each time).
TOLERANCE = {"bf16": 0.01, "int8": 0.02, "int4": 0.06}
SANITY = 0.1
"""Whatever the sign, the loss stays this close to fp32 state's."""
STEPS = 40


def _roundtrip(x: torch.Tensor, role: lowbit.Role, dtype: lowbit.StateDtype) -> torch.Tensor:
    store = QuantizedBuffer(x.numel(), role, dtype, x.device)
    scratch = torch.zeros(store.scratch_numel)
    scratch[: x.numel()] = x
    store.encode(scratch)
    return store.decode(torch.full((store.scratch_numel,), float("nan"))).clone()


def _blocks(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` zero-padded to whole blocks, one block a row."""
    block = BLOCK[bits]
    return torch.nn.functional.pad(x, (0, lowbit.padded(x.numel(), bits) - x.numel())).view(-1, block)


def _heavy_tailed(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.exp(2 * torch.randn(n, generator=g))


# -- the quantizers ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 127, 128, 129, 1000, 4099])
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_momentum_roundtrip_within_the_block_bound(dtype: str, n: int) -> None:
    bits = lowbit.BITS[dtype]
    qmax = 127 if bits == 8 else 7
    x = _heavy_tailed(n, n)
    out = _roundtrip(x, "momentum", dtype)
    # Companded: |sqrt-domain error| <= step / 2, so |error| <= absmax (1 / qmax + 1 / (4 qmax^2)) per block.
    bound = _blocks(x, bits).abs().amax(-1, keepdim=True) * (1 / qmax + 1 / (4 * qmax**2)) * (1 + 1e-5)
    err = _blocks(out - x, bits).abs()
    assert out.shape == x.shape and bool((err <= bound).all())
    assert bool((torch.sign(out) * torch.sign(x) >= 0).all())  # never flips a sign


@pytest.mark.parametrize("n", [1, 127, 129, 1000, 4099])
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_variance_roundtrip_is_zero_free_and_within_one_level(dtype: str, n: int) -> None:
    bits = lowbit.BITS[dtype]
    v = _heavy_tailed(n, n + 1) ** 2
    v[::7] = 0.0  # exact zeros and tiny values inside live blocks
    v[3::11] = 1e-30
    out = _roundtrip(v, "variance", dtype)
    root, blockmax = _blocks(v.sqrt(), bits), _blocks(v.sqrt(), bits).amax(-1, keepdim=True)
    step = blockmax / 2**bits
    got = _blocks(out.sqrt(), bits)[:, :]
    live = torch.arange(root.numel()).view(root.shape) < n
    assert bool(((got - root).abs() <= step * (1 + 1e-5))[live].all())
    assert bool((got >= step * (1 - 1e-5))[live].all())  # no value of a live block decodes to 0
    assert bool(torch.isfinite(out).all())


def test_tiny_variance_bounds_the_update_instead_of_exploding() -> None:
    for dtype in ("int8", "int4"):
        bits = lowbit.BITS[dtype]
        m = torch.full((BLOCK[bits],), 1e-3)
        v = torch.full((BLOCK[bits],), 1e-30)
        v[0] = 1.0
        ratio = _roundtrip(m, "momentum", dtype) / (_roundtrip(v, "variance", dtype).sqrt() + 1e-8)
        # The smallest level is blockmax / 2**bits: the update is at most 2**bits times m / sqrt(max v).
        assert float(ratio.abs().max()) <= 1e-3 * 2**bits * (1 + 1e-5)


@pytest.mark.parametrize("dtype", LOWBIT)
def test_zero_blocks_decode_to_zero_without_nan(dtype: str) -> None:
    zeros = torch.zeros(300)
    for role in ("momentum", "variance"):
        out = _roundtrip(zeros, role, dtype)
        assert torch.equal(out, zeros)
    denom = _roundtrip(zeros, "variance", dtype).sqrt() + 1e-8
    assert bool(torch.isfinite(_roundtrip(zeros, "momentum", dtype) / denom).all())


def test_bf16_rounds_to_nearest_and_buffers_start_at_zero() -> None:
    x = _heavy_tailed(77, 3)
    assert torch.equal(_roundtrip(x, "momentum", "bf16"), x.bfloat16().float())
    for dtype in LOWBIT:
        store = QuantizedBuffer(1000, "variance", dtype, torch.device("cpu"))
        assert torch.equal(store.decode(torch.ones(store.scratch_numel)), torch.zeros(1000))


def test_bytes_per_value() -> None:
    n = 1 << 16
    sizes = {d: QuantizedBuffer(n, "momentum", d, torch.device("cpu")).nbytes / n for d in LOWBIT}
    assert sizes == {"bf16": 2.0, "int8": 1 + 4 / 256, "int4": 0.5 + 4 / 128}


# -- the optimizers ---------------------------------------------------------------------------------


def _train(
    algorithm: str,
    dtype: str,
    steps: range,
    net: nn.Module | None = None,
    opt: optim.CompressedOptimizer | None = None,
    rank: int = 0,
    **extra: object,
):
    net = net or make_model()
    opt = opt or OPTIMIZERS[algorithm](net.parameters(), state_dtype=dtype, **{**OPTIONS[algorithm], **extra})
    for step in steps:
        x, y = batch(rank, step)
        opt.zero_grad(set_to_none=True)
        loss_of(net(x), y).backward()
        opt.step()
    return net, opt


def _held_out(net: nn.Module) -> float:
    with torch.no_grad():
        return sum(loss_of(net(x), y).item() for x, y in (batch(7, 10_000 + i) for i in range(8))) / 8


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_low_bit_state_trains_within_tolerance_of_fp32(algorithm: str) -> None:
    base = _held_out(_train(algorithm, "fp32", range(STEPS))[0])
    assert base < _held_out(make_model())
    for dtype in LOWBIT:
        net, opt = _train(algorithm, dtype, range(STEPS))
        _check_loss(_held_out(net), base, TOLERANCE[dtype], dtype)
        assert all(torch.isfinite(p).all() for p in net.parameters())
        assert "exp_avg" not in opt.state[next(net.parameters())]  # kept per bucket, not per parameter


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_parameter_without_gradients_stays_put_in_int4(algorithm: str) -> None:
    # Its momentum and variance blocks are all zeros: 0 / (sqrt(0) + eps), never NaN.
    net = make_model()
    idle = nn.Parameter(torch.randn(300))
    opt = OPTIMIZERS[algorithm](
        [*net.parameters(), idle], state_dtype="int4", **{**OPTIONS[algorithm], "weight_decay": 0.0}
    )
    before = idle.detach().clone()
    _train(algorithm, "int4", range(14), net, opt)
    assert torch.equal(idle.detach(), before)
    assert all(torch.isfinite(p).all() for p in net.parameters())


def _check_loss(loss: float, base: float, tolerance: float, what: str) -> None:
    assert loss <= base * (1 + tolerance) and abs(loss / base - 1) <= SANITY, f"{what}: {loss} vs fp32 state {base}"


def test_fp32_state_is_unchanged() -> None:
    net, opt = _train("OneBitAdam", "fp32", range(12))
    sd = opt.state_dict()
    assert "lowbit" not in sd["distcomp"]["buckets"][0]
    assert sd["state"][0]["exp_avg"].dtype == torch.float32
    assert opt.state_bytes()["momentum"] == opt.state_bytes()["variance"] == 4.0


def test_stats_report_state_bytes_per_parameter() -> None:
    net = nn.Linear(512, 64, bias=False)  # 32768 values: one bucket of whole blocks
    expected = {"fp32": 4.0, "bf16": 2.0, "int8": 1 + 4 / 256, "int4": 0.5 + 4 / 128}
    for dtype, per_value in expected.items():
        opt = optim.OneBitAdam(net.parameters(), lr=1e-3, freeze_step=2, state_dtype=dtype)
        for _ in range(3):
            opt.zero_grad()
            net(torch.randn(4, 512)).sum().backward()
            opt.step()
        state = opt.stats()["state"]
        assert state["momentum"] == state["variance"] == per_value
        assert state["total"] == 2 * per_value + state["errors"] + state["other"]


def _saved(opt: torch.optim.Optimizer) -> dict:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype", ("fp32", *LOWBIT))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_resume_is_bit_identical(algorithm: str, dtype: str) -> None:
    # Saved inside the warm-up (and for 0/1 Adam inside a local interval); resumed across the freeze.
    save_at, total = 7, 22
    net, opt = _train(algorithm, dtype, range(save_at))
    saved, params = _saved(opt), [p.detach().clone() for p in net.parameters()]
    _train(algorithm, dtype, range(save_at, total), net, opt)
    again = make_model()
    with torch.no_grad():
        for p, q in zip(again.parameters(), params):
            p.copy_(q)
    opt2 = OPTIMIZERS[algorithm](again.parameters(), state_dtype=dtype, **OPTIONS[algorithm])
    opt2.load_state_dict(saved)
    _train(algorithm, dtype, range(save_at, total), again, opt2)
    assert digest(again.parameters()) == digest(net.parameters())
    later = _saved(opt)  # and once more from the compressed phase
    assert all(torch.equal(a, b) for a, b in zip(_tensors(later), _tensors(_saved(opt2))))


def _tensors(sd: dict) -> list[torch.Tensor]:
    out = [t for st in sd["state"].values() for t in st.values() if isinstance(t, torch.Tensor)]
    for bucket in sd["distcomp"]["buckets"]:
        out += [t for store in bucket.get("lowbit", {}).values() for t in store.values()]
    return out


def test_checkpoint_of_another_state_dtype_is_refused_with_the_fix() -> None:
    _, opt = _train("OneBitAdam", "int8", range(3))
    saved = _saved(opt)
    for other in ("fp32", "int4"):
        fresh = optim.OneBitAdam(make_model().parameters(), state_dtype=other, **OPTIONS["OneBitAdam"])
        with pytest.raises(CheckpointError, match="build it with state_dtype='int8'"):
            fresh.load_state_dict(saved)
    _, opt32 = _train("OneBitAdam", "fp32", range(3))
    fresh = optim.OneBitAdam(make_model().parameters(), state_dtype="int4", **OPTIONS["OneBitAdam"])
    with pytest.raises(CheckpointError, match="state_dtype='fp32'"):
        fresh.load_state_dict(_saved(opt32))


def test_checkpoint_without_state_dtype_loads_as_fp32() -> None:
    net, opt = _train("OneBitAdam", "fp32", range(3))
    saved = _saved(opt)
    del saved["distcomp"]["config"]["state_dtype"]  # written before the option existed
    optim.OneBitAdam(make_model().parameters(), **OPTIONS["OneBitAdam"]).load_state_dict(saved)


def test_damaged_low_bit_state_is_refused() -> None:
    _, opt = _train("OneBitAdam", "int4", range(3))
    saved = _saved(opt)
    store = saved["distcomp"]["buckets"][0]["lowbit"]["exp_avg"]
    store["codes"] = store["codes"][:-1]
    fresh = optim.OneBitAdam(make_model().parameters(), state_dtype="int4", **OPTIONS["OneBitAdam"])
    with pytest.raises(CheckpointError, match="low-bit 'exp_avg'"):
        fresh.load_state_dict(saved)


def test_unknown_state_dtype_is_refused() -> None:
    with pytest.raises(ConfigError, match="state_dtype"):
        optim.OneBitAdam(make_model().parameters(), state_dtype="int2")


def test_distcomp_train_takes_state_dtype_in_the_optimizer_section() -> None:
    from distcomp.train.config import config_from_raw

    raw = {"version": 1, "optimizer": {"name": "onebit_lamb", "onebit_lamb": {"state_dtype": "int4", "freeze_step": 5}}}
    assert config_from_raw(raw).optimizer.compressed_config("onebit_lamb").state_dtype == "int4"


# -- 2 ranks over gloo, with and without DDP ---------------------------------------------------------


def _ranks(rank: int, world: int, runs: list[tuple[str, str, bool]]) -> list[tuple[float, str]]:
    out = []
    for algorithm, dtype, ddp in runs:
        net = make_model()
        opt = OPTIMIZERS[algorithm](net.parameters(), state_dtype=dtype, **OPTIONS[algorithm])
        model: nn.Module = net
        if ddp:
            model = DDP(net)
            optim.register(model, opt)
        for step in range(STEPS):
            x, y = batch(rank, step)
            opt.zero_grad(set_to_none=True)
            loss_of(model(x), y).backward()
            opt.step()
        assert opt.world_size == world == dist.get_world_size()
        out.append((_held_out(net), digest(net.parameters())))
    return out


@pytest.mark.slow
def test_two_ranks_train_within_tolerance_of_fp32() -> None:
    runs = [(a, d, False) for a in ALGORITHMS for d in ("fp32", *LOWBIT)]
    runs += [("OneBitAdam", d, True) for d in ("fp32", "int4")] + [("ZeroOneAdam", d, True) for d in ("fp32", "int8")]
    out = run_ranks(_ranks, 2, args=(runs,), timeout=400)
    for i, (algorithm, dtype, ddp) in enumerate(runs):
        assert out[0][i][1] == out[1][i][1], f"{algorithm} {dtype} ddp={ddp}: ranks hold different parameters"
        base = out[0][runs.index((algorithm, "fp32", ddp))][0]
        _check_loss(out[0][i][0], base, TOLERANCE.get(dtype, 0.0), f"{algorithm} {dtype} ddp={ddp}")
