"""Shared fixtures of the test suite.

``pg1`` gives a test a real 1-rank gloo process group in this process, so that
compressors and :class:`~distcomp.comm.Comm` run their actual collectives
without spawning anything. Multi-rank tests use :func:`distcomp.testing.run_ranks`.
The launcher's ``hosts`` fixture lives in ``tests/launch/conftest.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist


# Timeouts, one rule: a test's own budgets (run_ranks(timeout=...), subprocess
# timeouts, wait_for(...) deadlines, its fixtures' included) are where it times
# out, with a message that says what it was waiting for. pytest-timeout is only
# the backstop behind them, so its limit must exceed the sum of the budgets a
# test can wait through, setup of module fixtures included (the first test to
# use one pays for it):
# - a test not marked ``slow`` runs in this process and gets the ini default
#   (``timeout`` in pyproject.toml, 120 s): no budget of its own reaches that;
# - a ``slow`` test gets SLOW_TIMEOUT_S, above the largest such sum among them
#   (the 590 s Triton compile check; a 500 s run_ranks fixture plus a test's
#   own 200 s call);
# - a test whose budgets add up to more carries its own ``timeout`` mark,
#   with the sum written next to it.
SLOW_TIMEOUT_S = 900


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give every ``slow`` test without a ``timeout`` mark of its own the slow limit."""
    for item in items:
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


def _destroy_default_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def pg1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A 1-rank gloo default process group for the duration of one test, destroyed even if the test fails."""
    # A group left behind by a test that crashed mid-setup would make init fail here.
    _destroy_default_group()
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # no network lookup of the host name
    store = dist.FileStore(str(tmp_path / "pg_store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=30))
    try:
        yield
    finally:
        _destroy_default_group()


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed, so every test draws the same data on every run."""
    return torch.Generator().manual_seed(1234)
