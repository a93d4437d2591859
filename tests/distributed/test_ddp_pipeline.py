"""The pipelined two-phase schedule: bucket i+1's all-to-all overlaps bucket i's all-gather, results unchanged.

Pipelining moves only the waits: every rank issues the same collectives in the
same order, and each bucket's state is updated in bucket order, so parameters,
losses and the compressors' checkpoints match the sequential worker bit for bit.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from ddp_tasks import BUCKET_MB, TINY, batch, corpus, digest

import distcomp
from distcomp.models.gpt import GPT
from distcomp.testing import run_ranks

pytestmark = pytest.mark.slow  # trains on 2 ranks

STEPS = 8
COMPRESSORS = ["sign", "int8", "int4"]


def _train(rank: int, world_size: int, runs: list[tuple[str, bool]]) -> list[dict[str, Any]]:
    """Per ``(compressor, pipeline)``: every step's parameter digest and loss, and the final compression state."""
    data, out = corpus(), []
    for name, pipeline in runs:
        torch.manual_seed(0)
        model = GPT(TINY)
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=BUCKET_MB)
        state = distcomp.register(ddp, name, pipeline=pipeline)
        opt = torch.optim.AdamW(ddp.parameters(), lr=3e-3)
        digests, losses = [], []
        for step in range(STEPS):
            x, y = batch(data, rank, step)
            opt.zero_grad(set_to_none=True)
            _, loss = ddp(x, y)
            loss.backward()
            opt.step()
            digests.append(digest(model))
            losses.append(loss.item())
        executor = type(state._executor).__name__
        overlapped = getattr(state._executor, "overlapped", 0)
        out.append({"digests": digests, "losses": losses, "state": state.state_dict(), "stats": state.stats(),
                    "executor": executor, "overlapped": overlapped})
        state.close()
    return out


@pytest.fixture(scope="module")
def runs() -> list[list[dict[str, Any]]]:
    plan = [(name, pipeline) for name in COMPRESSORS for pipeline in (True, False)]
    return run_ranks(_train, 2, args=(plan,), timeout=400)


@pytest.mark.parametrize("index", range(len(COMPRESSORS)), ids=COMPRESSORS)
def test_pipelined_matches_sequential_bit_for_bit(runs: list[list[dict[str, Any]]], index: int) -> None:
    for rank in runs:
        piped, plain = rank[2 * index], rank[2 * index + 1]
        assert (piped["executor"], plain["executor"]) == ("PipelinedExecutor", "WorkerExecutor")
        assert piped["stats"]["step"]["buckets"] >= 4, "the tiny model must be spread over several buckets"
        assert piped["stats"]["step"]["compressed"]
        assert piped["digests"] == plain["digests"]
        assert piped["losses"] == plain["losses"]
        for (k, a), (_, b) in zip(_leaves(piped["state"]), _leaves(plain["state"]), strict=True):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, k
    assert runs[0][2 * index]["digests"] == runs[1][2 * index]["digests"], "replicas agree"


def test_buckets_did_overlap(runs: list[list[dict[str, Any]]]) -> None:
    """The comparison above means something only if some bucket started while the one before it was on the wire."""
    assert sum(r["overlapped"] for rank in runs for r in rank) > 0


def _leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(tree, dict):
        return [kv for k in sorted(tree, key=str) for kv in _leaves(tree[k], f"{prefix}/{k}")]
    if isinstance(tree, list | tuple):
        return [kv for i, v in enumerate(tree) for kv in _leaves(v, f"{prefix}/{i}")]
    return [(prefix, tree)]
