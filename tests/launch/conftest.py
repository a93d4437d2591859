"""Fixtures of the launcher's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from launch_netns import NetHost, cannot_create_reason, two_hosts


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[NetHost, NetHost]]:
    """Two "hosts": network namespaces joined by a veth pair (``launch_netns.py``), for one test module."""
    reason = cannot_create_reason()
    if reason is not None:
        pytest.skip(f"network namespaces cannot be created here: {reason}")
    with two_hosts() as pair:
        yield pair
