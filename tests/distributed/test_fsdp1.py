"""FSDP1 (``FullyShardedDataParallel``) compression on real gloo processes: training, resume, errors.

One 2-rank job trains every run in a row (process start-up dominates on a model this
small), a second resumes the saved runs; the tests then assert on the results.
"""

from __future__ import annotations

import pytest
import torch
from fsdp1_tasks import Run, errors, train_many

from distcomp.testing import run_ranks

pytestmark = pytest.mark.slow  # every test starts 2 gloo ranks

WORLD = 2
STEPS = 30
SHORT = 10
RESUME_AT = 12
# Final loss (mean of the last 5 steps) may exceed plain FSDP1's by at most this fraction.
TOLERANCE = {"int8": 0.02, "int4": 0.05, "sign": 0.2, "bf16": 0.02, "fp16": 0.01, "topk": 0.2, "randomk": 0.3}
OPTIONS = {"topk": {"ratio": 0.3}, "randomk": {"ratio": 0.5}}
# Variants of the wrapping: each trained plain, with "none" and with int8 for SHORT steps.
VARIANTS: dict[str, dict] = {
    "orig-params": {"use_orig_params": True},
    "shard-grad-op": {"strategy": "SHARD_GRAD_OP"},
    "bf16-reduce": {"reduce_dtype": "bfloat16"},
    "fp16-reduce": {"reduce_dtype": "float16"},
    "accumulate": {"accumulate": 2},
}
INT8 = {"start_step": 0}
PARAMS = {"0.0.weight": (12, 6), "0.0.bias": (12,), "1.0.weight": (5, 12), "1.0.bias": (5,), "2.weight": (3, 5)}
PARAMS["2.bias"] = (3,)


def _tail(losses: list[float]) -> float:
    return sum(losses[-5:]) / 5


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    path = str(tmp_path_factory.mktemp("fsdp1") / "ckpt")
    runs = {
        "fsdp": Run(None),
        "none": Run("none"),
        **{c: Run(c, options={"start_step": 0, **OPTIONS.get(c, {})}) for c in TOLERANCE},
        "int8-ef-bf16": Run("int8", options=INT8, error_feedback="bf16"),
        **{
            f"{name}-{kind}": Run(compressor, options=options, steps=SHORT, **variant)
            for name, variant in VARIANTS.items()
            for kind, compressor, options in (("fsdp", None, {}), ("none", "none", {}), ("int8", "int8", INT8))
        },
        "sign-saved": Run("sign", save_at=RESUME_AT, path=path + "-sign"),
        "int8-bf16-saved": Run("int8", error_feedback="bf16", save_at=RESUME_AT, path=path + "-int8"),
    }
    first = run_ranks(train_many, WORLD, args=(list(runs.values()),), timeout=480)
    out = {name: [r[i] for r in first] for i, name in enumerate(runs)}
    resumed = [
        Run("sign", resume_from=path + "-sign"),
        Run("int8", error_feedback="bf16", resume_from=path + "-int8"),
    ]
    second = run_ranks(train_many, WORLD, args=(resumed,), timeout=240)
    out["sign-resumed"] = [r[0] for r in second]
    out["int8-bf16-resumed"] = [r[1] for r in second]
    return out


def _assert_identical(a: dict, b: dict) -> None:
    assert a["losses"] == b["losses"]
    for name, p in a["params"].items():
        assert torch.equal(b["params"][name], p), name


@pytest.mark.parametrize("variant", ["", *VARIANTS])
def test_none_is_bit_identical_to_fsdp1_without_hook(trained: dict[str, list[dict]], variant: str) -> None:
    prefix = f"{variant}-" if variant else ""
    for rank in range(WORLD):
        _assert_identical(trained[f"{prefix}fsdp"][rank], trained[f"{prefix}none"][rank])


@pytest.mark.parametrize("name", [*TOLERANCE, "int8-ef-bf16"])
def test_compressed_loss_close_to_uncompressed(trained: dict[str, list[dict]], name: str) -> None:
    base = _tail(trained["fsdp"][0]["losses"])
    got = _tail(trained[name][0]["losses"])
    tol = TOLERANCE.get(name, TOLERANCE["int8"] * 2)
    assert got <= base * (1 + tol), f"{name}: final loss {got:.4f} vs FSDP1 {base:.4f}"
    stats = trained[name][0]["stats"]
    assert stats["units"] == 3 and stats["total"]["compressed_steps"] > 0 and stats["total"]["sent_bytes"] > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_int8_trains_per_variant(trained: dict[str, list[dict]], variant: str) -> None:
    plain = trained[f"{variant}-fsdp"][0]["losses"]
    got = trained[f"{variant}-int8"][0]["losses"]
    assert abs(got[-1] - plain[-1]) <= 0.05 * plain[-1], f"{variant}: {got[-1]:.4f} vs {plain[-1]:.4f}"


@pytest.mark.parametrize("name", ["none", *TOLERANCE, "sign-saved", *(f"{v}-int8" for v in VARIANTS)])
def test_full_parameters_identical_across_ranks(trained: dict[str, list[dict]], name: str) -> None:
    first, second = trained[name]
    for key, p in first["params"].items():
        assert torch.equal(second["params"][key], p), key


@pytest.mark.parametrize("name", ["int8", "orig-params-int8"])
def test_residuals_are_keyed_by_parameter_name_in_its_shape(trained: dict[str, list[dict]], name: str) -> None:
    assert trained[name][0]["residuals"] == PARAMS
    assert set(PARAMS) <= set(trained[name][0]["params"]), "residual keys are the model's state_dict keys"


def test_error_feedback_memory_is_reported(trained: dict[str, list[dict]]) -> None:
    # One residual per unit over its flat gradient padded to 2 chunks: 84, 65 -> 66 and 18 values.
    assert trained["int8"][0]["stats"]["ef_bytes"] == 4 * (84 + 66 + 18)
    assert trained["int8-ef-bf16"][0]["stats"]["ef_bytes"] == 2 * (84 + 66 + 18)


@pytest.mark.parametrize("name", ["sign", "int8-bf16"])
def test_resume_is_bit_identical(trained: dict[str, list[dict]], name: str) -> None:
    for rank in range(WORLD):
        whole, resumed = trained[f"{name}-saved"][rank], trained[f"{name}-resumed"][rank]
        assert resumed["losses"] == whole["losses"][RESUME_AT:]
        for key, p in whole["params"].items():
            assert torch.equal(resumed["params"][key], p), key


@pytest.fixture(scope="module")
def mistakes() -> list[dict[str, str]]:
    return run_ranks(errors, WORLD, timeout=180)


def test_nonfinite_step_is_nonfinite_everywhere_and_keeps_residuals(mistakes: list[dict[str, str]]) -> None:
    assert all(m["nonfinite_grads"] == "True" for m in mistakes), "a scaler must see the skipped step on every rank"
    assert all(m["residuals_kept"] == "True" for m in mistakes), "a non-finite step must leave the residuals untouched"


def test_error_messages(mistakes: list[dict[str, str]]) -> None:
    messages = mistakes[0]
    assert "ConfigError" in messages["no_shard"] and "distcomp.register" in messages["no_shard"]
    assert "replicate_group" in messages["no_shard"], "hybrid sharding's fix is FSDP2 with replicate_group"
    assert "ConfigError" in messages["replicate_group"] and "fully_shard" in messages["replicate_group"]
    assert "ConfigError" in messages["error_feedback"] and "FSDP1" in messages["error_feedback"]
    assert "ConfigError" in messages["powersgd"]
    assert "outermost" in messages["not_root"]
    assert "before the first forward" in messages["after_forward"]
    assert "once" in messages["twice"]
    assert "CheckpointError" in messages["world_size"] and "same world size" in messages["world_size"]
    assert "CheckpointError" in messages["fsdp2_format"] and "distcomp.fsdp1/1" in messages["fsdp2_format"]
    assert "CheckpointError" in messages["unknown_param"] and "nope.weight" in messages["unknown_param"]
    assert "CheckpointError" in messages["wrong_shape"] and "do not match" in messages["wrong_shape"]
