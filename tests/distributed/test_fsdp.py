"""FSDP2 compression on real gloo processes: the compressed reduce-scatter, training, resume, errors.

Each fixture starts one 2-rank job that runs many cases in a row (process start-up
dominates on a model this small); the tests then assert on its results.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fsdp_tasks import Case, Run, errors, nonfinite_step, reduce_scatter_cases, train_many

from distcomp.testing import run_ranks

pytestmark = pytest.mark.slow  # every test starts 2 gloo ranks

WORLD = 2
# Relative error of one call's output against the exact reduction (per compressor).
ONE_CALL = {
    "none": 1e-6,
    "fp16": 1e-3,
    "bf16": 8e-3,
    "int8": 0.03,
    "int4": 0.3,
    "sign": 1.2,
    "topk": 1.0,
    "randomk": 1.5,
}
# With error feedback, the mean over many calls with the same input approaches the exact reduction.
MANY_CALLS = {"int8": 0.01, "int4": 0.02, "sign": 0.15, "topk": 0.1, "randomk": 0.15}
SPARSE = {"topk": {"ratio": 0.3}, "randomk": {"ratio": 0.3}}
CALLS = 150
SCALE = {"avg": 1.0 / WORLD, "sum": 1.0, "premul": 0.3}

CASES = (
    [Case(c, options=SPARSE.get(c, {})) for c in ONE_CALL]
    + [Case(c, op=op) for c in ("none", "int8", "sign", "bf16") for op in ("sum", "premul")]
    + [Case(c, dtype=d, op="sum") for c in ("none", "int8", "fp16") for d in ("bfloat16", "float16")]
    + [Case(c, shard=s) for c in ("none", "int4", "sign") for s in (1, 5, 300)]
    + [Case(c, options=SPARSE.get(c, {}), calls=CALLS, shard=1000) for c in MANY_CALLS]
    + [Case("int8", calls=CALLS, shard=1000, error_feedback="bf16")]
)


def _id(case: Case) -> str:
    return f"{case.compressor}-{case.op}-{case.dtype}-{case.shard}-x{case.calls}-ef{case.error_feedback}"


@pytest.fixture(scope="module")
def reduced() -> list[list[dict]]:
    return run_ranks(reduce_scatter_cases, WORLD, args=(CASES,), timeout=240)


def _reference(inputs: list[torch.Tensor], case: Case, rank: int) -> torch.Tensor:
    """The exact reduction of rank ``rank``'s chunk, computed in fp32 from every rank's input."""
    chunks = [x.float().view(WORLD, case.shard)[rank] for x in inputs]
    return torch.stack(chunks).sum(0) * SCALE[case.op]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("index", range(len(CASES)), ids=[_id(c) for c in CASES])
def test_reduce_scatter_matches_reference(reduced: list[list[dict]], index: int) -> None:
    case = CASES[index]
    inputs = [reduced[r][index]["input"] for r in range(WORLD)]
    for rank in range(WORLD):
        got = reduced[rank][index]
        ref = _reference(inputs, case, rank)
        if case.compressor == "none":
            assert torch.equal(got["first"], got["exact"].float()), "none must be FSDP's own reduce-scatter"
        dtype_tol = {"float32": 0.0, "bfloat16": 8e-3, "float16": 1e-3}[case.dtype]
        assert _rel(got["first"], ref) <= ONE_CALL[case.compressor] + dtype_tol
        if case.calls > 1:
            assert _rel(got["mean"], ref) <= MANY_CALLS[case.compressor], "error feedback must cancel the bias"


@pytest.mark.parametrize("compressor", ["int8", "sign", "bf16", "topk"])
def test_nonfinite_step_is_nonfinite_everywhere_and_keeps_residuals(compressor: str) -> None:
    results = run_ranks(nonfinite_step, WORLD, args=(compressor,), timeout=120)
    assert all(not r["finite"] for r in results), "a scaler must see the skipped step on every rank"
    assert all(r["kept"] for r in results), "a non-finite step must leave the residuals untouched"


# -- training ----------------------------------------------------------------------

STEPS = 30
# Final loss (mean of the last 5 steps) may exceed plain FSDP2's by at most this fraction.
TOLERANCE = {"int8": 0.02, "int4": 0.05, "sign": 0.2, "bf16": 0.02, "fp16": 0.01, "topk": 0.2, "randomk": 0.3}
OPTIONS = {"topk": {"ratio": 0.3}, "randomk": {"ratio": 0.5}}
RESUME_AT = 12


def _tail(losses: list[float]) -> float:
    return sum(losses[-5:]) / 5


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    path = str(tmp_path_factory.mktemp("fsdp") / "ckpt")
    runs = {
        "fsdp": Run(None, steps=STEPS),
        "none": Run("none", steps=STEPS),
        **{c: Run(c, options={"start_step": 0, **OPTIONS.get(c, {})}, steps=STEPS) for c in TOLERANCE},
        "int8-ef-bf16": Run("int8", options={"start_step": 0}, error_feedback="bf16", steps=STEPS),
        "int8-ef-none": Run("int8", options={"start_step": 0}, error_feedback="none", steps=STEPS),
        "accumulate-fsdp": Run(None, steps=10, accumulate=2),
        "accumulate-none": Run("none", steps=10, accumulate=2),
        "accumulate-int8": Run("int8", options={"start_step": 0}, steps=10, accumulate=2),
        "frozen-fsdp": Run(None, steps=10, frozen=True),
        "frozen-none": Run("none", steps=10, frozen=True),
        "frozen-int8": Run("int8", options={"start_step": 0}, steps=10, frozen=True),
        "fp16-reduce-fsdp": Run(None, steps=10, reduce_dtype="float16"),
        "fp16-reduce-none": Run("none", steps=10, reduce_dtype="float16"),
        "fp16-reduce-int8": Run("int8", options={"start_step": 0}, steps=10, reduce_dtype="float16"),
        "bf16-reduce-int8": Run("int8", options={"start_step": 0}, steps=10, reduce_dtype="bfloat16"),
        "sign-saved": Run("sign", steps=STEPS, save_at=RESUME_AT, path=path + "-sign"),
        "int8-saved": Run("int8", steps=STEPS, save_at=RESUME_AT, path=path + "-int8"),
    }
    first = run_ranks(train_many, WORLD, args=(list(runs.values()),), timeout=300)
    out = {name: [r[i] for r in first] for i, name in enumerate(runs)}
    resumed = [
        Run("sign", steps=STEPS, resume_from=path + "-sign"),
        Run("int8", steps=STEPS, resume_from=path + "-int8"),
    ]
    second = run_ranks(train_many, WORLD, args=(resumed,), timeout=120)
    out["sign-resumed"] = [r[0] for r in second]
    out["int8-resumed"] = [r[1] for r in second]
    return out


def test_none_is_bit_identical_to_plain_fsdp(trained: dict[str, list[dict]]) -> None:
    for rank in range(WORLD):
        plain, none = trained["fsdp"][rank], trained["none"][rank]
        assert none["losses"] == plain["losses"]
        for name, p in plain["params"].items():
            assert torch.equal(none["params"][name], p), name


@pytest.mark.parametrize("name", [*TOLERANCE, "int8-ef-bf16", "int8-ef-none"])
def test_compressed_loss_close_to_uncompressed(trained: dict[str, list[dict]], name: str) -> None:
    base = _tail(trained["fsdp"][0]["losses"])
    got = _tail(trained[name][0]["losses"])
    tol = TOLERANCE.get(name, TOLERANCE["int8"] * 2)
    assert got <= base * (1 + tol), f"{name}: final loss {got:.4f} vs FSDP {base:.4f}"
    stats = trained[name][0]["stats"]
    # No ratio check: on units this small the codecs' block padding outweighs the saving.
    assert stats["units"] == 3 and stats["total"]["compressed_steps"] > 0 and stats["total"]["sent_bytes"] > 0


@pytest.mark.parametrize("name", ["none", *TOLERANCE, "int8-ef-bf16", "accumulate-int8", "sign-saved"])
def test_full_parameters_identical_across_ranks(trained: dict[str, list[dict]], name: str) -> None:
    first, second = trained[name]
    for key, p in first["params"].items():
        assert torch.equal(second["params"][key], p), key


def test_error_feedback_memory_is_reported(trained: dict[str, list[dict]]) -> None:
    fp32 = trained["int8"][0]["stats"]["ef_bytes"]
    bf16 = trained["int8-ef-bf16"][0]["stats"]["ef_bytes"]
    none = trained["int8-ef-none"][0]["stats"]["ef_bytes"]
    # Residuals cover every unit's padded unsharded gradient: (12*6+12) + (6*12+6) + (4*5+4) values in fp32.
    assert fp32 == 4 * ((6 * 12 + 12) + (6 * 12 + 6) + (4 * 5 + 4))
    assert bf16 == fp32 // 2 and none == 0


def test_gradient_accumulation_without_sync(trained: dict[str, list[dict]]) -> None:
    assert trained["accumulate-none"][0]["losses"] == trained["accumulate-fsdp"][0]["losses"]
    plain, compressed = trained["accumulate-fsdp"][0]["losses"], trained["accumulate-int8"][0]["losses"]
    assert abs(compressed[-1] - plain[-1]) <= 0.05 * plain[-1]


@pytest.mark.parametrize("variant", ["frozen", "fp16-reduce"])
def test_frozen_parameters_and_reduce_dtype(trained: dict[str, list[dict]], variant: str) -> None:
    plain = trained[f"{variant}-fsdp"][0]
    assert trained[f"{variant}-none"][0]["losses"] == plain["losses"]
    runs = [f"{variant}-int8"] + (["bf16-reduce-int8"] if variant == "fp16-reduce" else [])
    for name in runs:
        assert abs(trained[name][0]["losses"][-1] - plain["losses"][-1]) <= 0.05 * plain["losses"][-1], name
    if variant == "frozen":
        # The frozen bias has no residual: 4 fewer padded values (2 rows of a 3-row bias, on 2 ranks).
        assert trained["frozen-int8"][0]["stats"]["ef_bytes"] == 4 * ((6 * 12 + 12) + (6 * 12 + 6) + 4 * 5)


@pytest.mark.parametrize("compressor", ["sign", "int8"])
def test_resume_is_bit_identical(trained: dict[str, list[dict]], compressor: str) -> None:
    for rank in range(WORLD):
        whole, resumed = trained[f"{compressor}-saved"][rank], trained[f"{compressor}-resumed"][rank]
        assert resumed["losses"] == whole["losses"][RESUME_AT:]
        for name, p in whole["params"].items():
            assert torch.equal(resumed["params"][name], p), name


def test_error_messages(tmp_path) -> None:
    messages = run_ranks(errors, WORLD, args=(str(tmp_path),), timeout=120)[0]
    assert "ConfigError" in messages["not_fsdp"] and "fully_shard" in messages["not_fsdp"]
    assert "blocksize" in messages["unknown_option"]
    assert "int9" in messages["unknown_compressor"]
    assert "error_feedback" in messages["bad_error_feedback"]
    assert "replicate_group" in messages["powersgd"]
    assert "RankMismatchError" in messages["ranks_disagree"]
    assert "CheckpointError" in messages["world_size"] and "same world size" in messages["world_size"]
    assert "CheckpointError" in messages["config"]


# -- reshard_after_forward and activation checkpointing -------------------------------

# Explicit True also reshards the root module after forward (the default keeps the root unsharded).
SETTINGS: dict[str, dict[str, Any]] = {
    "reshard": {"reshard_after_forward": True},
    "no-reshard": {"reshard_after_forward": False},
    "checkpoint-function": {"checkpoint": "function"},
    "checkpoint-wrapper": {"checkpoint": "wrapper"},
    "no-reshard-checkpoint": {"reshard_after_forward": False, "checkpoint": "wrapper"},
}


@pytest.fixture(scope="module")
def settings() -> dict[str, list[dict]]:
    runs = {
        f"{name}-{variant}": Run(compressor, options=options, steps=STEPS, **setting)
        for name, setting in SETTINGS.items()
        for variant, compressor, options in (
            ("fsdp", None, {}),
            ("none", "none", {}),
            ("int8", "int8", {"start_step": 0}),
        )
    }
    results = run_ranks(train_many, WORLD, args=(list(runs.values()),), timeout=240)
    return {name: [r[i] for r in results] for i, name in enumerate(runs)}


@pytest.mark.parametrize("setting", SETTINGS)
def test_none_is_bit_identical_to_plain_fsdp_per_setting(settings: dict[str, list[dict]], setting: str) -> None:
    for rank in range(WORLD):
        plain, none = settings[f"{setting}-fsdp"][rank], settings[f"{setting}-none"][rank]
        assert none["losses"] == plain["losses"]
        for name, p in plain["params"].items():
            assert torch.equal(none["params"][name], p), name


@pytest.mark.parametrize("setting", SETTINGS)
def test_int8_trains_and_keeps_ranks_identical_per_setting(settings: dict[str, list[dict]], setting: str) -> None:
    base = _tail(settings[f"{setting}-fsdp"][0]["losses"])
    got = _tail(settings[f"{setting}-int8"][0]["losses"])
    assert got <= base * (1 + TOLERANCE["int8"]), f"{setting}: final loss {got:.4f} vs FSDP {base:.4f}"
    assert settings[f"{setting}-int8"][0]["stats"]["total"]["compressed_steps"] > 0
    first, second = settings[f"{setting}-int8"]
    for key, p in first["params"].items():
        assert torch.equal(second["params"][key], p), key
