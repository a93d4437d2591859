"""The compressed exchange overlapped with backward (DDP + ``register(overlap=True)``) against the step-time path.

Every comparison is bit for bit: parameters and the whole optimizer state
(momenta, worker and server errors, scalars) after every step, on 2 gloo ranks,
with DDP buckets much smaller than the optimizer's fused buckets.
"""

from __future__ import annotations

import pytest
from optim_overlap_tasks import OverlapRun, train_many

from distcomp.testing import run_ranks

pytestmark = pytest.mark.slow  # real 2-rank jobs

ALGORITHMS = ["OneBitAdam", "ZeroOneAdam", "OneBitLamb"]
# Overlapped steps of each algorithm's compressed phase (0/1 Adam: a synchronisation).
INF_AT = {"OneBitAdam": 6, "ZeroOneAdam": 9, "OneBitLamb": 6}
# Checkpoints written by the step-time path: one in the warm-up (the resumed run crosses into the
# compressed phase) and one in the compressed phase.
SAVE_AT = {"OneBitAdam": (3, 7), "ZeroOneAdam": (4, 9), "OneBitLamb": (3, 7)}
VARIANTS: dict[str, dict] = {
    "plain": {},
    "nonfinite": {"inf_at": None},  # filled in per algorithm
    "clipped": {"clip": 0.05},
    "gradscaler": {"scaler": True},
    "backward_twice": {"backward_twice": 8},
    "int8_state": {"options": {"state_dtype": "int8"}},
    "int4_state": {"options": {"state_dtype": "int4"}},
}


def _run(algorithm: str, variant: str, overlap: bool, **extra: object) -> OverlapRun:
    kw = dict(VARIANTS[variant])
    if variant == "nonfinite":
        kw["inf_at"] = INF_AT[algorithm]
    return OverlapRun(algorithm=algorithm, overlap=overlap, **{**kw, **extra})


def _runs(ckpt: str) -> list[OverlapRun]:
    runs = [_run(a, v, o) for a in ALGORITHMS for v in VARIANTS for o in (True, False)]
    for a in ALGORITHMS:
        for k in SAVE_AT[a]:
            runs.append(_run(a, "plain", False, save_at=k, ckpt_dir=f"{ckpt}/{a}{k}"))
    return runs


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("overlap_ckpt")
    for a in ALGORITHMS:
        for k in SAVE_AT[a]:
            (root / f"{a}{k}").mkdir()
    return str(root)


@pytest.fixture(scope="module")
def two_ranks(ckpt_root: str) -> dict:
    runs = _runs(ckpt_root)
    return {"runs": runs, "out": run_ranks(train_many, 2, args=(runs,), timeout=500)}


def _result(job: dict, run: OverlapRun) -> list[dict]:
    """Both ranks' results of ``run``."""
    i = job["runs"].index(run)
    return [job["out"][rank][i] for rank in range(2)]


def _pair(job: dict, algorithm: str, variant: str) -> tuple[list[dict], list[dict]]:
    return _result(job, _run(algorithm, variant, True)), _result(job, _run(algorithm, variant, False))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_overlapped_equals_step_time_path(two_ranks: dict, algorithm: str, variant: str) -> None:
    on, off = _pair(two_ranks, algorithm, variant)
    for rank in range(2):
        assert on[rank]["digests"] == off[rank]["digests"], f"rank {rank}: parameters differ"
        assert on[rank]["states"] == off[rank]["states"], f"rank {rank}: optimizer state differs"
        assert on[rank]["skipped"] == off[rank]["skipped"]
        assert off[rank]["overlapped"] == 0
    if variant in ("clipped", "gradscaler"):  # the step sees gradients backward did not: it falls back, for good
        assert all(not r["still_overlapping"] for r in on)
        assert all(r["overlapped"] == 0 for r in on)
    else:
        assert all(r["still_overlapping"] for r in on)
        assert all(r["overlapped"] >= 4 for r in on), [r["overlapped"] for r in on]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_nonfinite_step_is_skipped_everywhere(two_ranks: dict, algorithm: str) -> None:
    """An inf on rank 1 during an overlapped step: every rank skips it and keeps its state as it was."""
    on, _ = _pair(two_ranks, algorithm, "nonfinite")
    k = INF_AT[algorithm]
    for r in on:
        assert r["skipped"] == [s == k for s in range(len(r["skipped"]))], r["skipped"]
        assert r["nonfinite"][k]
        assert r["digests"][k] == r["digests"][k - 1]
        assert r["states"][k] == r["states"][k - 1], "the skipped step must leave every state buffer as it was"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_resume_with_overlap_from_step_time_checkpoint(two_ranks: dict, ckpt_root: str, algorithm: str) -> None:
    """Checkpoints of the step-time path resume bit for bit with the overlap on (from the warm-up, and mid-phase)."""
    runs = [
        _run(algorithm, "plain", True, resume=True, ckpt_dir=f"{ckpt_root}/{algorithm}{k}") for k in SAVE_AT[algorithm]
    ]
    resumed = run_ranks(train_many, 2, args=(runs,), timeout=200)
    for i, k in enumerate(SAVE_AT[algorithm]):
        full = _result(two_ranks, _run(algorithm, "plain", False, save_at=k, ckpt_dir=f"{ckpt_root}/{algorithm}{k}"))
        for rank in range(2):
            assert resumed[rank][i]["digests"] == full[rank]["digests"][k:], f"rank {rank} diverged after resume at {k}"
            assert resumed[rank][i]["states"] == full[rank]["states"][k:]
            assert resumed[rank][i]["overlapped"] >= 1
