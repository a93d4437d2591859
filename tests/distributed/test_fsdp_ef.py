"""FSDP2 with int8 worker residuals (``error_feedback="int8"``) on real gloo processes.

Training close to plain FSDP2, ranks that agree, the memory reported, a resume
bit-identical to the uninterrupted run, and checkpoints of another mode refused.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fsdp_tasks import Run, _model, train_many
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import distcomp.fsdp
from distcomp.errors import CheckpointError
from distcomp.testing import run_ranks

pytestmark = pytest.mark.slow  # every test starts 2 gloo ranks

WORLD = 2
STEPS = 30
RESUME_AT = 12
# Final loss (mean of the last 5 steps) may exceed plain FSDP2's by at most this fraction: the
# tolerances of tests/distributed/test_fsdp.py for fp32 residuals, doubled for the int8 residuals.
TOLERANCE = {"int8": 0.04, "sign": 0.4}
START = {"start_step": 0}


def _tail(losses: list[float]) -> float:
    return sum(losses[-5:]) / 5


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = str(tmp_path_factory.mktemp("fsdp-ef") / "ckpt")
    runs = {
        "fsdp": Run(None, steps=STEPS),
        **{c: Run(c, options=START, error_feedback="int8", steps=STEPS) for c in TOLERANCE},
        **{
            f"{c}-saved": Run(c, error_feedback="int8", steps=STEPS, save_at=RESUME_AT, path=f"{path}-{c}")
            for c in TOLERANCE
        },
        "fp32-saved": Run("int8", error_feedback="fp32", steps=RESUME_AT, save_at=RESUME_AT, path=f"{path}-fp32"),
    }
    first = run_ranks(train_many, WORLD, args=(list(runs.values()),), timeout=300)
    out: dict[str, Any] = {name: [r[i] for r in first] for i, name in enumerate(runs)}
    resumed = [Run(c, error_feedback="int8", steps=STEPS, resume_from=f"{path}-{c}") for c in TOLERANCE]
    second = run_ranks(train_many, WORLD, args=(resumed,), timeout=180)
    for i, c in enumerate(TOLERANCE):
        out[f"{c}-resumed"] = [r[i] for r in second]
    out["refusals"] = run_ranks(load_other_modes, WORLD, args=(path,), timeout=180)[0]
    return out


def load_other_modes(rank: int, world_size: int, path: str) -> dict[str, str]:
    """Load a checkpoint into a state of another error-feedback mode, both ways; the messages."""
    mesh = init_device_mesh("cpu", (world_size,))
    out = {}
    for saved, mode in (("fp32", "int8"), ("int8", "fp32")):
        model = _model()
        for block in model[:2]:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        state = distcomp.fsdp.register(model, "int8", error_feedback=mode)
        ckpt = torch.load(f"{path}-{saved}-rank{rank}.pt", weights_only=False)
        try:
            state.load_state_dict(ckpt["compression"])
        except CheckpointError as error:
            out[f"{saved}->{mode}"] = f"CheckpointError: {error}"
        else:
            out[f"{saved}->{mode}"] = "no error"
    return out


@pytest.mark.parametrize("compressor", list(TOLERANCE))
def test_int8_residuals_train_close_to_plain_fsdp(trained: dict[str, Any], compressor: str) -> None:
    base = _tail(trained["fsdp"][0]["losses"])
    got = _tail(trained[compressor][0]["losses"])
    assert got <= base * (1 + TOLERANCE[compressor]), f"{compressor}: final loss {got:.4f} vs FSDP {base:.4f}"
    stats = trained[compressor][0]["stats"]
    assert stats["error_feedback"] == "int8" and stats["total"]["compressed_steps"] > 0


@pytest.mark.parametrize("compressor", list(TOLERANCE))
def test_full_parameters_identical_across_ranks(trained: dict[str, Any], compressor: str) -> None:
    first, second = trained[compressor]
    for key, p in first["params"].items():
        assert torch.equal(second["params"][key], p), key


def test_int8_residual_memory_is_reported(trained: dict[str, Any]) -> None:
    # Six parameters, each a padded shard of at most 36 values: one block of 128 int8 codes and one
    # fp32 scale per parameter and destination rank.
    assert trained["int8"][0]["stats"]["ef_bytes"] == 6 * WORLD * (128 + 4)


@pytest.mark.parametrize("compressor", list(TOLERANCE))
def test_resume_is_bit_identical(trained: dict[str, Any], compressor: str) -> None:
    for rank in range(WORLD):
        whole, resumed = trained[f"{compressor}-saved"][rank], trained[f"{compressor}-resumed"][rank]
        assert resumed["losses"] == whole["losses"][RESUME_AT:]
        for name, p in whole["params"].items():
            assert torch.equal(resumed["params"][name], p), name


def test_checkpoint_of_another_mode_is_refused(trained: dict[str, Any]) -> None:
    for key, message in trained["refusals"].items():
        assert message.startswith("CheckpointError") and "error_feedback" in message, key
