"""What a rank's compression checkpoint must match before it loads: format, settings, world and rank.

The DDP, FSDP and HSDP states each save one file per rank; residuals belong to
one rank's data and cannot be redistributed, so all three refuse the same
mismatches with the same messages.
"""

from __future__ import annotations

from typing import Any

from distcomp.errors import CheckpointError


def check_rank_state(
    state: Any,
    *,
    fmt: str,
    what: str,
    config: dict[str, Any],
    options: dict[str, Any] | None = None,
    world: dict[str, Any],
    rank: int,
    world_fix: str,
) -> dict[str, Any]:
    """Raise a :class:`CheckpointError` unless ``state`` is a ``fmt`` state that matches this rank.

    It must have been saved with the compression ``config`` (saved under
    ``"config"``), the other ``options`` a trajectory depends on (each under its
    own key), the ``world`` (world size and, where it matters, the mesh) and
    ``rank``. Returns ``state``.
    """
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise CheckpointError(f"not a distcomp {what} state (expected format {fmt!r})")
    saved_config = state.get("config") or {}
    diffs = {
        k: (saved_config.get(k), config.get(k))
        for k in sorted(saved_config.keys() | config.keys())
        if saved_config.get(k) != config.get(k)
    }
    diffs.update({k: (state.get(k), v) for k, v in (options or {}).items() if state.get(k) != v})
    if diffs:
        raise CheckpointError(
            f"checkpoint was written with other compression settings: {diffs} (saved, current); "
            "register with the settings it was saved with"
        )
    saved = {k: state.get(k) for k in world}
    if saved != world:
        raise CheckpointError(
            f"checkpoint was written by a job of {_describe(saved)}, this one has {_describe(world)}: "
            f"error residuals are per rank and cannot be redistributed; {world_fix}"
        )
    if state["rank"] != rank:
        raise CheckpointError(
            f"checkpoint was written by rank {state['rank']} but this is rank {rank}: load each rank's own file"
        )
    return state


def _describe(world: dict[str, Any]) -> str:
    text = f"{world['world_size']} ranks"
    return text + (f" on mesh {tuple(world['mesh'])}" if "mesh" in world else "")
