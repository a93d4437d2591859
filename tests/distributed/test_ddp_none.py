"""``none`` with overlap issues DDP's all-reduce from the hook itself: still DDP bit for bit, still counted.

The records of a step are added once all its buckets are done, so the step's
bucket count, bytes and the non-finite flag are those of the worker-thread path.
"""

from __future__ import annotations

from typing import Any

import pytest
from ddp_tasks import Run, train_many

from distcomp.testing import run_ranks

pytestmark = pytest.mark.slow  # trains on 2 ranks

STEPS = 8
RUNS = [Run(compressor=None, steps=STEPS, inf_at=5), Run(compressor="none", steps=STEPS, inf_at=5),
        Run(compressor="none", steps=STEPS, inf_at=5, overlap=False)]


@pytest.fixture(scope="module")
def results() -> list[list[dict[str, Any]]]:
    return run_ranks(train_many, 2, args=(RUNS,), timeout=300)


def test_direct_none_matches_ddp_through_a_skipped_step(results: list[list[dict[str, Any]]]) -> None:
    for rank in results:
        ddp, direct, inline = rank
        assert direct["skipped"] == [False] * 5 + [True, False, False]
        assert direct["digests"] == ddp["digests"] == inline["digests"]
        assert direct["losses"] == ddp["losses"]


def test_direct_none_stats_match_the_inline_path(results: list[list[dict[str, Any]]]) -> None:
    for rank in results:
        direct, inline = rank[1]["stats"], rank[2]["stats"]
        assert direct["total"]["nonfinite_steps"] == inline["total"]["nonfinite_steps"] == 1
        assert direct["total"]["steps"] == inline["total"]["steps"] == STEPS
        for key in ("buckets", "numel", "dense_bytes", "payload_bytes", "sent_bytes", "collectives", "compressed"):
            assert direct["step"][key] == inline["step"][key], key
        assert [b["index"] for b in direct["buckets"]] == list(range(direct["step"]["buckets"]))
        assert direct["step"]["exposed_comm_s"] > 0.0 and direct["step"]["comm_s"] > 0.0
