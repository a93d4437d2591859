"""DDP integration on real gloo processes: replicas agree, training converges, state resumes exactly.

Each fixture starts one job that runs several trainings in a row (process
start-up dominates on small models); the tests then assert on its results.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from ddp_tasks import (
    Run, dead_peer, dtype_runs, mismatched_register, one_bad_bucket_many, train_many, worker_group_timeout,
)
from distcomp.testing import run_ranks

pytestmark = pytest.mark.slow  # every test trains on 2 or 4 ranks

STEPS = 40
# 4 ranks on 2 cores take twice as long per step; at 30 steps every compressor's final loss stays well inside
# its tolerance (observed: sign 1.085 and topk 1.074 of DDP's, against 1.15 and 1.12; at 40: 1.092, 1.054).
FOUR_RANK_STEPS = 30
# Final loss (mean of the last 5 steps) may exceed plain DDP's by at most this fraction.
TOLERANCE = {
    "none": 0.0,
    "fp16": 0.01,
    "bf16": 0.02,
    "powersgd": 0.06,
    "int8": 0.02,
    "int4": 0.05,
    "sign": 0.15,
    "topk": 0.12,
    "randomk": 0.25,
}
# Adam normalises each coordinate, so sparse updates cost more here than with SGD:
# random-k needs a large ratio to stay close within 40 steps.
OPTIONS = {"topk": {"ratio": 0.05}, "randomk": {"ratio": 0.25}}
EF_COMPRESSORS = ["powersgd", "topk", "randomk", "sign", "int8", "int4"]


def _runs(names: list[str], steps: int = STEPS, **kw: object) -> list[Run]:
    return [Run(compressor=None, steps=steps, **kw)] + [
        Run(compressor=n, options=OPTIONS.get(n, {}), steps=steps, **kw) for n in names
    ]


def _tail(losses: list[float]) -> float:
    return sum(losses[-5:]) / 5


@pytest.fixture(scope="module")
def two_ranks() -> dict[str, list[dict]]:
    names = list(TOLERANCE)
    results = run_ranks(train_many, 2, args=(_runs(names),), timeout=400)
    return {name: [r[i] for r in results] for i, name in enumerate(["ddp", *names])}


@pytest.fixture(scope="module")
def four_ranks() -> dict[str, list[dict]]:
    names = ["none", "powersgd", "sign", "topk", "int4"]
    results = run_ranks(train_many, 4, args=(_runs(names, FOUR_RANK_STEPS),), timeout=400)
    return {name: [r[i] for r in results] for i, name in enumerate(["ddp", *names])}


@pytest.mark.parametrize("name", list(TOLERANCE))
def test_replicas_identical_every_step_2_ranks(two_ranks: dict, name: str) -> None:
    ranks = two_ranks[name]
    assert len(ranks[0]["digests"]) == STEPS
    assert ranks[0]["digests"] == ranks[1]["digests"]


@pytest.mark.parametrize("name", list(TOLERANCE))
def test_loss_close_to_ddp_2_ranks(two_ranks: dict, name: str) -> None:
    base = _tail(two_ranks["ddp"][0]["losses"])
    got = _tail(two_ranks[name][0]["losses"])
    assert got <= base * (1 + TOLERANCE[name]) + 1e-6, f"{name}: {got:.4f} vs DDP {base:.4f}"
    assert two_ranks["ddp"][0]["losses"][-1] < two_ranks["ddp"][0]["losses"][0] - 1.0, "the task must actually train"


def test_none_is_bit_identical_to_ddp(two_ranks: dict) -> None:
    assert two_ranks["none"][0]["digests"] == two_ranks["ddp"][0]["digests"]


@pytest.mark.parametrize("name", [n for n in TOLERANCE if n != "none"])
def test_stats_report_compression(two_ranks: dict, name: str) -> None:
    stats = two_ranks[name][0]["stats"]
    assert stats["step"]["buckets"] >= 4, "the tiny model must be spread over several buckets"
    assert stats["total"]["steps"] == STEPS
    assert stats["step"]["compressed"]
    assert stats["step"]["ratio"] > 1.5
    assert stats["step"]["sent_bytes"] < stats["step"]["dense_bytes"]
    assert stats["total"]["nonfinite_steps"] == 0


def test_powersgd_several_buckets_ratio(two_ranks: dict) -> None:
    stats = two_ranks["powersgd"][0]["stats"]["step"]
    assert stats["ratio"] > 3, stats


@pytest.mark.parametrize("name", ["none", "powersgd", "sign", "topk", "int4"])
def test_four_ranks(four_ranks: dict, name: str) -> None:
    ranks = four_ranks[name]
    assert all(r["digests"] == ranks[0]["digests"] for r in ranks[1:])
    base = _tail(four_ranks["ddp"][0]["losses"])
    assert _tail(ranks[0]["losses"]) <= base * (1 + TOLERANCE[name]) + 1e-6


def test_four_ranks_none_bit_identical(four_ranks: dict) -> None:
    assert four_ranks["none"][0]["digests"] == four_ranks["ddp"][0]["digests"]


LOST = "the optimizer was resumed from a checkpoint but the powersgd compression state was not"


@pytest.mark.parametrize("overlap", [True, False], ids=["worker", "inline"])
def test_resume_continues_bit_identically(tmp_path, overlap: bool) -> None:
    """Save at step 6, resume in new processes with a new DDP: the next steps equal the uninterrupted run.

    With the worker, two more runs checkpoint as frameworks do (one file from rank 0, the
    compression gathered by distcomp.state_dict) and resume with and without the compression state.
    """
    names = EF_COMPRESSORS if overlap else ["powersgd", "sign", "topk"]
    full, resumed = [], []
    for name in names:
        ckpt = tmp_path / name
        ckpt.mkdir()
        kw = dict(compressor=name, options=OPTIONS.get(name, {}), steps=10, overlap=overlap, ckpt_dir=str(ckpt))
        full.append(Run(save_at=6, **kw))
        resumed.append(Run(resume=True, **kw))
    if overlap:
        (tmp_path / "single").mkdir()
        kw = dict(compressor="powersgd", steps=10, ckpt_dir=str(tmp_path / "single"), single_file=True)
        full.append(Run(save_at=6, **kw))
        resumed += [Run(resume=True, **kw), Run(resume=True, restore_compression=False, **kw)]
    first = run_ranks(train_many, 2, args=(full,), timeout=300)
    second = run_ranks(train_many, 2, args=(resumed,), timeout=300)
    for i, name in enumerate(names + ["single-file powersgd"] * overlap):
        for rank in range(2):
            a, b = first[rank][i], second[rank][i]
            assert b["digests"] == a["digests"][6:], f"{name} rank {rank} diverged after resume"
            assert b["losses"] == a["losses"][6:]
            assert not any(LOST in w for w in a["warnings"] + b["warnings"]), name
    if overlap:  # the same single file, resumed without its compression state: warned, and it diverges
        for rank in range(2):
            lost = second[rank][-1]
            assert sum(LOST in w for w in lost["warnings"]) == 1, lost["warnings"]
            assert lost["digests"] != first[rank][-1]["digests"][6:]


def test_find_unused_parameters_and_no_sync() -> None:
    runs = [
        Run(compressor=None, steps=12, find_unused=True, accumulate=2),
        Run(compressor="powersgd", steps=12, find_unused=True, accumulate=2),
        Run(compressor="sign", steps=12, find_unused=True, accumulate=2),
        Run(compressor="sign", steps=12, find_unused=True, accumulate=2, overlap=False),
    ]
    results = run_ranks(train_many, 2, args=(runs,), timeout=300)
    for i, run in enumerate(runs):
        assert results[0][i]["digests"] == results[1][i]["digests"], run
        losses = results[0][i]["losses"]
        assert losses[-1] < losses[0], run


DTYPE_CASES = [
    (c, d) for c in ("powersgd", "sign", "int8", "topk", "fp16", "bf16") for d in ("float16", "bfloat16", "float32")
]


@pytest.fixture(scope="module")
def dtype_job() -> list[list[dict[str, Any]]]:
    """Every case of DTYPE_CASES trained in one 2-rank job (process start-up would dominate one job each)."""
    return run_ranks(dtype_runs, 2, args=(DTYPE_CASES, 12), timeout=300)


@pytest.mark.parametrize("case", range(len(DTYPE_CASES)), ids=[f"{c}-{d}" for c, d in DTYPE_CASES])
def test_half_precision_parameters(dtype_job: list[list[dict[str, Any]]], case: int) -> None:
    ranks = [r[case] for r in dtype_job]
    assert ranks[0]["digests"] == ranks[1]["digests"]
    assert all(l == l and l < 1e4 for l in ranks[0]["losses"]), ranks[0]["losses"]
    assert ranks[0]["losses"][-1] < ranks[0]["losses"][0]


def test_nonfinite_gradient_is_skipped_and_residuals_survive(tmp_path) -> None:
    """An inf on one rank makes the step non-finite everywhere (GradScaler skips it); residuals are untouched."""
    runs = [Run(compressor=name, steps=8, inf_at=5) for name in EF_COMPRESSORS]
    results = run_ranks(train_many, 2, args=(runs,), timeout=300)
    for i, run in enumerate(runs):
        for rank in range(2):
            r = results[rank][i]
            assert r["skipped"] == [False] * 5 + [True, False, False], (run.compressor, r["skipped"])
            assert r["digests"][5] == r["digests"][4], "the skipped step must not change the parameters"
            assert r["stats"]["total"]["nonfinite_steps"] == 1
            assert all(l == l for l in r["losses"][6:]), "training continues with finite losses"
        assert results[0][i]["digests"] == results[1][i]["digests"]


def _same_state(a: Any, b: Any) -> bool:
    """Whether two compressor states hold the same keys, tensors (bit for bit) and values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same_state, a, b))
    return a == b


def test_step_skipped_for_one_bad_bucket_leaves_every_buckets_state_as_it_was() -> None:
    """A non-finite gradient in one bucket of one rank: every bucket's residuals, server residuals,
    Q matrices and random streams, on both ranks, are exactly what they were before that step."""
    names = ["powersgd", "sign", "int8", "int4", "topk", "randomk"]
    runs = [Run(compressor=n, options=OPTIONS.get(n, {}), steps=8, inf_at=5, overlap=overlap)
            for overlap in (True, False) for n in names]
    results = run_ranks(one_bad_bucket_many, 2, args=(runs, "blocks.0.out.weight"), timeout=280)
    for i, run in enumerate(runs):
        for rank in range(2):
            r, where = results[rank][i], f"{run.compressor} overlap={run.overlap} rank {rank}"
            assert r["buckets"] >= 4, "the tiny model must be spread over several buckets"
            assert r["skipped"] == [False] * 5 + [True, False, False], (where, r["skipped"])
            assert r["nonfinite_steps"] == 1, where
            states = r["states"]  # states[s]: before step s
            assert _same_state(states[6], states[5]), f"{where}: the skipped step changed the compressor state"
            assert not _same_state(states[5], states[4]), f"{where}: a finite step must change the state"
            assert not _same_state(states[7], states[6]), f"{where}: training must go on after the skipped step"


def test_config_mismatch_raises_on_every_rank() -> None:
    start = time.monotonic()
    messages = run_ranks(mismatched_register, 2, timeout=60)
    assert time.monotonic() - start < 60
    for msg in messages:
        assert "ranks disagree" in msg and "rank 1" in msg and "rank=8" in msg, msg


@pytest.mark.parametrize("overlap", [True, False], ids=["worker", "inline"])
def test_dead_peer_gives_an_error_not_a_hang(overlap: bool) -> None:
    start = time.monotonic()
    results = run_ranks(dead_peer, 2, args=(overlap,), timeout=120, collective_timeout=15, allow_exit=True)
    assert results[1] is None
    assert results[0].startswith("raised"), results[0]
    assert time.monotonic() - start < 90


def test_worker_group_times_out_like_the_job() -> None:
    assert run_ranks(worker_group_timeout, 2, collective_timeout=23, timeout=60) == [23.0, 23.0]
