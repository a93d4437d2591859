"""HSDP with a compressed replica all-reduce, on 4 gloo ranks as a 2x2 (replicate, shard) mesh.

One job trains every method in a row (process start-up dominates on a tiny
model), the run of RESUMED saving a checkpoint part-way; a second job resumes
it in new processes. The tests then assert on what the jobs returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from distcomp.testing import run_ranks

pytestmark = pytest.mark.slow  # every test trains on 4 ranks

STEPS = 30
SAVE_AT = 12
ACCUMULATED_STEPS = 4
# Final loss (mean of the last 5 steps) may exceed native HSDP's by at most this fraction.
TOLERANCE = {"none": 0.0, "powersgd": 0.06, "int8": 0.02, "sign": 0.15, "topk": 0.12, "bf16": 0.01}
OPTIONS: dict[str, dict[str, Any]] = {
    # Blocks small enough for shards of a few hundred values (a block is the unit of padding).
    "int8": {"block": 32},
    "sign": {"block": 32},
    "powersgd": {"rank": 2},
    "topk": {"ratio": 0.25},
}
RESUMED = "powersgd"
BF16_REDUCED = ["powersgd", "int8"]


@dataclass
class Run:
    method: str
    """``native`` (torch's HSDP on the 2-D mesh) or a compressor name (1-D FSDP plus distcomp)."""
    options: dict[str, Any] = field(default_factory=dict)
    error_feedback: str = "fp32"
    reduce_bf16: bool = False
    """Reduce gradients in bfloat16 (``MixedPrecisionPolicy(reduce_dtype=torch.bfloat16)``)."""

    @property
    def key(self) -> str:
        """The name the run's results are kept under: the method, then what differs from the defaults."""
        key = self.method if self.error_feedback == "fp32" else f"{self.method}-ef_{self.error_feedback}"
        return f"{key}-bf16" if self.reduce_bf16 else key


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 5 output rows over 2 shards: uneven shards (3 + 2 rows), so the shards carry padding.
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)
    )


def _shard(model: torch.nn.Module, mesh: Any, reduce_bf16: bool = False) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(reduce_dtype=torch.bfloat16 if reduce_bf16 else None)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, 16, generator=g)
    teacher = torch.Generator().manual_seed(7)
    w = torch.randn(16, 1, generator=teacher)
    return x, torch.tanh(x @ w)


def _build(run: Run, mesh: Any) -> tuple[torch.nn.Module, Any]:
    import distcomp.fsdp

    model = _model()
    if run.method == "native":
        _shard(model, mesh)
        return model, None
    _shard(model, mesh["shard"], run.reduce_bf16)
    group = mesh.get_group("replicate")
    state = distcomp.fsdp.register(
        model, run.method, replicate_group=group, error_feedback=run.error_feedback, **run.options
    )
    return model, state


def _train(model: torch.nn.Module, rank: int, steps: range) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    losses = []
    for step in steps:
        x, y = _batch(rank, step)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / dist.get_world_size())
    return losses


def _train_accumulating(model: torch.nn.Module, rank: int, steps: int) -> None:
    """Two micro-batches per step, the first without gradient sync: only the second backward reduces."""
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for step in range(steps):
        for micro in range(2):
            model.set_requires_gradient_sync(micro == 1)
            x, y = _batch(rank, 2 * step + micro)
            ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()


def _full(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().clone() for p in model.parameters()]


def _local(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.to_local().clone() for p in model.parameters()]


def _mesh() -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))


def train_all(rank: int, world_size: int, runs: list[Run], ckpt: str) -> dict[str, Any]:
    mesh = _mesh()
    out: dict[str, Any] = {}
    for run in runs:
        model, state = _build(run, mesh)
        if run == Run(RESUMED, OPTIONS[RESUMED]):
            # The checkpointed run: save at SAVE_AT, as a training script would, then carry on uninterrupted
            # (plain SGD keeps no state between the two calls).
            losses = _train(model, rank, range(SAVE_AT))
            torch.save({"model": _local(model), "compression": state.state_dict()}, f"{ckpt}-{rank}.pt")
            losses += _train(model, rank, range(SAVE_AT, STEPS))
        else:
            losses = _train(model, rank, range(STEPS))
        out[run.key] = {
            "losses": losses,
            "full": _full(model),
            "stats": state.stats() if state else None,
        }
    for method in ("native", "none"):
        model, state = _build(Run(method), mesh)
        _train_accumulating(model, rank, ACCUMULATED_STEPS)
        out[f"accumulated-{method}"] = {"full": _full(model), "stats": state.stats() if state else None}
    out["nonfinite"] = _nonfinite_step(rank, mesh)
    out["native_mesh_error"] = _native_mesh_error(mesh)
    out["bf16_residual_error"] = _error(lambda: _build(Run("int8", error_feedback="bf16"), mesh))
    return out


def _nonfinite_step(rank: int, mesh: Any) -> dict[str, Any]:
    """A NaN loss on rank 0 after a few steps: every rank's step is non-finite and no residual changes."""
    model, state = _build(Run("int8", OPTIONS["int8"]), mesh)
    _train(model, rank, range(3))
    before = state.state_dict()
    x, y = _batch(rank, 3)
    loss = ((model(x) - y) ** 2).mean() * (float("nan") if rank == 0 else 1.0)
    loss.backward()
    after = state.state_dict()
    residuals_kept = all(
        torch.equal(before["compressor"]["residuals"][k], v) for k, v in after["compressor"]["residuals"].items()
    )
    # What a grad scaler checks: some gradient of this rank is non-finite (empty shards have none to show).
    grads_nonfinite = any(not bool(torch.isfinite(p.grad.to_local()).all()) for p in model.parameters())
    return {"stats": state.stats(), "residuals_kept": residuals_kept, "grads_nonfinite": grads_nonfinite}


def _error(fn: Any) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test asserts on the type and message
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _native_mesh_error(mesh: Any) -> str:
    import distcomp.fsdp

    model = _model()
    _shard(model, mesh)
    return _error(lambda: distcomp.fsdp.register(model, "int8", replicate_group=mesh.get_group("replicate")))


def resume(rank: int, world_size: int, ckpt: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    import distcomp.fsdp

    saved = torch.load(f"{ckpt}-{rank}.pt", weights_only=True)
    mesh = _mesh()
    model, state = _build(Run(RESUMED, OPTIONS[RESUMED]), mesh)
    with torch.no_grad():
        for p, t in zip(model.parameters(), saved["model"]):
            p.to_local().copy_(t)
    state.load_state_dict(saved["compression"])
    _train(model, rank, range(SAVE_AT, STEPS))
    # The same job on a (4 replicas, 1 shard) mesh must refuse the 2x2 checkpoint.
    other = init_device_mesh("cpu", (4, 1), mesh_dim_names=("replicate", "shard"))
    model4 = _model()
    _shard(model4, other["shard"])
    state4 = distcomp.fsdp.register(model4, RESUMED, replicate_group=other.get_group("replicate"), **OPTIONS[RESUMED])
    try:
        state4.load_state_dict(saved["compression"])
        error = "no error"
    except Exception as exc:  # noqa: BLE001 - the test asserts on the type and message
        error = f"{type(exc).__name__}: {exc}"
    return {"full": _full(model), "mesh_error": error}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], list[dict]]:
    ckpt = str(Path(tmp_path_factory.mktemp("hsdp")) / "ckpt")
    runs = [Run("native")] + [Run(name, OPTIONS.get(name, {})) for name in TOLERANCE]
    runs.append(Run("int8", OPTIONS["int8"], error_feedback="none"))
    runs += [Run(name, OPTIONS.get(name, {}), reduce_bf16=True) for name in BF16_REDUCED]
    first = run_ranks(train_all, 4, args=(runs, ckpt), timeout=300)
    second = run_ranks(resume, 4, args=(ckpt,), timeout=120)
    return first, second


def _tail(losses: list[float]) -> float:
    return sum(losses[-5:]) / 5


def test_none_is_bit_identical_to_native_hsdp(jobs: tuple) -> None:
    first, _ = jobs
    for rank in first:
        assert all(torch.equal(a, b) for a, b in zip(rank["native"]["full"], rank["none"]["full"]))
        assert rank["native"]["losses"] == rank["none"]["losses"]


@pytest.mark.parametrize("name", list(TOLERANCE))
def test_full_parameters_identical_on_all_ranks(jobs: tuple, name: str) -> None:
    first, _ = jobs
    for rank in first[1:]:
        assert all(torch.equal(a, b) for a, b in zip(first[0][name]["full"], rank[name]["full"]))


@pytest.mark.parametrize("name", list(TOLERANCE))
def test_loss_close_to_native_hsdp(jobs: tuple, name: str) -> None:
    first, _ = jobs
    base = first[0]["native"]["losses"]
    got = _tail(first[0][name]["losses"])
    assert base[-1] < base[0] / 2, "the task must actually train"
    assert got <= _tail(base) * (1 + TOLERANCE[name]) + 1e-6, f"{name}: {got:.4f} vs native {_tail(base):.4f}"


@pytest.mark.parametrize("name", ["powersgd", "int8", "sign", "topk", "bf16"])
def test_compressors_send_less_than_dense(jobs: tuple, name: str) -> None:
    first, _ = jobs
    stats = first[0][name]["stats"]
    assert stats["total"]["steps"] == STEPS
    assert stats["total"]["compressed_steps"] > 0
    assert stats["total"]["sent_bytes"] < stats["total"]["dense_bytes"]


def test_error_feedback_memory_is_reported(jobs: tuple) -> None:
    first, _ = jobs
    assert first[0]["int8"]["stats"]["ef_bytes"] > 0
    assert first[0]["none"]["stats"]["ef_bytes"] == 0


def test_without_error_feedback_replicas_agree_and_keep_no_residual(jobs: tuple) -> None:
    first, _ = jobs
    assert first[0]["int8-ef_none"]["stats"]["ef_bytes"] == 0
    assert first[0]["int8-ef_none"]["stats"]["total"]["compressed_steps"] > 0
    for rank in first[1:]:
        assert all(torch.equal(a, b) for a, b in zip(first[0]["int8-ef_none"]["full"], rank["int8-ef_none"]["full"]))


def test_nonfinite_step_is_nonfinite_everywhere_and_keeps_residuals(jobs: tuple) -> None:
    first, _ = jobs
    for rank in first:
        got = rank["nonfinite"]
        assert got["stats"]["total"]["nonfinite_steps"] == 1
        assert got["grads_nonfinite"]
        assert got["residuals_kept"]


@pytest.mark.parametrize("name", BF16_REDUCED)
def test_bf16_reduce_dtype_trains_and_replicas_agree(jobs: tuple, name: str) -> None:
    first, _ = jobs
    got = first[0][f"{name}-bf16"]
    assert got["stats"]["total"]["compressed_steps"] > 0
    assert _tail(got["losses"]) <= _tail(first[0]["native"]["losses"]) * (1 + 2 * TOLERANCE[name]) + 1e-3
    for rank in first[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got["full"], rank[f"{name}-bf16"]["full"]))


def test_bf16_residuals_are_refused(jobs: tuple) -> None:
    first, _ = jobs
    assert first[0]["bf16_residual_error"].startswith("ConfigError"), first[0]["bf16_residual_error"]
    assert '"fp32" or "none"' in first[0]["bf16_residual_error"]


def test_gradient_accumulation_matches_native_hsdp(jobs: tuple) -> None:
    first, _ = jobs
    for rank in first:
        native, none = rank["accumulated-native"], rank["accumulated-none"]
        assert all(torch.equal(a, b) for a, b in zip(native["full"], none["full"]))
        assert none["stats"]["total"]["steps"] == ACCUMULATED_STEPS  # a backward without sync is no step


def test_resume_is_bit_identical(jobs: tuple) -> None:
    first, second = jobs
    for before, after in zip(first, second):
        assert all(torch.equal(a, b) for a, b in zip(before[RESUMED]["full"], after["full"]))


def test_load_on_another_mesh_is_refused(jobs: tuple) -> None:
    _, second = jobs
    for rank in second:
        assert rank["mesh_error"].startswith("CheckpointError"), rank["mesh_error"]
        assert "resume on the same mesh" in rank["mesh_error"]


def test_native_hsdp_mesh_is_refused(jobs: tuple) -> None:
    first, _ = jobs
    assert first[0]["native_mesh_error"].startswith("ConfigError"), first[0]["native_mesh_error"]
    assert 'mesh["shard"]' in first[0]["native_mesh_error"]
