"""Check once, at registration, that every rank asked for the same compression.

Ranks that disagree would issue different collectives and hang much later;
gathering the settings up front turns that into an immediate error on every
rank that names the ranks and the keys that differ.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from distcomp.errors import RankMismatchError


def check_agreement(
    settings: dict[str, Any], group: dist.ProcessGroup | None = None, what: str = "compression config"
) -> None:
    """All-gather ``settings`` (plain values) and raise :class:`RankMismatchError` on every rank if they differ."""
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, settings, group=group)
    reference = gathered[0]
    differing = [r for r, s in enumerate(gathered) if s != reference]
    if not differing:
        return
    lines = []
    for r in differing:
        keys = sorted(set(reference) | set(gathered[r]))
        diffs = [
            f"{k}={gathered[r].get(k, '<missing>')!r} (rank 0: {reference.get(k, '<missing>')!r})"
            for k in keys
            if gathered[r].get(k) != reference.get(k)
        ]
        lines.append(f"rank {r}: " + ", ".join(diffs))
    raise RankMismatchError(
        f"ranks disagree on the {what}; ranks {differing} differ from rank 0: "
        + "; ".join(lines)
        + ". Every rank must register the same compressor with the same options."
    )
