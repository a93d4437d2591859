"""``exposed_comm_s``: the communication a backward pass could not hide, as DDP hooks report it.

It runs from the last hook call of a backward pass to the end of that step's
communication, so it is never negative and never longer than the step itself;
the cumulative total is the sum of the steps'.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
from ddp_tasks import Run, batch, build, corpus

from distcomp.testing import run_ranks

pytestmark = pytest.mark.slow  # trains on 2 ranks

STEPS = 6


def _timed_steps(rank: int, world_size: int, runs: list[Run]) -> list[dict[str, Any]]:
    """Per run: every step's wall time and ``stats()["step"]``, and the final cumulative stats."""
    data, out = corpus(), []
    for run in runs:
        _, ddp, state = build(run)
        opt = torch.optim.AdamW(ddp.parameters(), lr=run.lr)
        walls, steps = [], []
        for step in range(run.steps):
            x, y = batch(data, rank, step)
            dist.barrier()
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            _, loss = ddp(x, y)
            loss.backward()
            opt.step()
            walls.append(time.perf_counter() - start)
            steps.append(state.stats()["step"])
        out.append({"walls": walls, "steps": steps, "total": state.stats()["total"]})
        state.close()
    return out


RUNS = [Run(compressor="none", steps=STEPS), Run(compressor="sign", steps=STEPS),
        Run(compressor="powersgd", steps=STEPS, overlap=False)]


@pytest.fixture(scope="module")
def timed() -> list[list[dict[str, Any]]]:
    return run_ranks(_timed_steps, 2, args=(RUNS,), timeout=300)


@pytest.mark.parametrize("index", range(len(RUNS)), ids=[f"{r.compressor}-{r.overlap}" for r in RUNS])
def test_exposed_comm_is_within_the_step(timed: list[list[dict[str, Any]]], index: int) -> None:
    for rank in timed:
        run = rank[index]
        exposed = [s["exposed_comm_s"] for s in run["steps"]]
        # Positive: the last bucket's own communication is always exposed.
        assert all(0.0 < e <= w for e, w in zip(exposed, run["walls"], strict=True)), (exposed, run["walls"])
        assert run["total"]["exposed_comm_s"] == pytest.approx(sum(exposed))
