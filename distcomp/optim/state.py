"""The compressed optimizers' state: fused flat buffers, and checkpoints that are exact or refused.

Per-element state (momentum, variance, worker error, ...) lives in one flat
fp32 buffer per bucket and key; ``optimizer.state[p][key]`` is a view into it,
so ``state_dict()`` numbers it by parameter like any torch optimizer.

``state_dict()`` is torch's (``state`` by parameter index, ``param_groups``) plus
a ``distcomp`` section::

    {"format": "distcomp.optim/1", "algorithm": "OneBitAdam", "config": {...},
     "world_size": 2, "rank": 0, "step": 400,
     "buckets": [{"params": [0, 1, 2], "server_error": tensor | None, "scalars": {...}}]}

Worker errors, moments and frozen variances are per parameter in ``state``;
a server error belongs to this rank's chunk of a fused bucket, so it is stored
with the bucket's parameter indices and checked against the layout and the
world size on load. Error buffers differ between ranks: save one file per rank.
``load_state_dict`` restores everything bit for bit (torch's own would cast the
fp32 state to the parameters' dtype).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

from distcomp.errors import CheckpointError
from distcomp.optim.layout import FlatLayout, build_layouts, local

FORMAT = "distcomp.optim/1"


def standalone(value: Any) -> Any:
    """A sharded state entry (a ``DTensor`` view of a fused buffer) as a ``DTensor`` of its own; others as they are."""
    if not isinstance(value, DTensor):
        return value
    return DTensor.from_local(
        value._local_tensor.clone(),
        value.device_mesh,
        value.placements,
        run_check=False,
        shape=value.shape,
        stride=value.stride(),
    )


def local_shards(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``optimizer.state_dict()`` with each sharded entry as this rank's plain local tensor.

    For a per-rank file that ``torch.load(weights_only=True)`` reads; ``load_state_dict``
    takes it on the same mesh (each entry's size is checked against the local shard).
    """
    state = {
        i: {k: v._local_tensor if isinstance(v, DTensor) else v for k, v in entries.items()}
        for i, entries in state_dict["state"].items()
    }
    return {**state_dict, "state": state}


def like_param(view: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``view`` as ``optimizer.state`` shows it: a ``DTensor`` over the same storage when ``param`` is sharded.

    So ``torch.distributed.checkpoint`` (and ``get_optimizer_state_dict``) see
    sharded state exactly as they see FSDP2's own parameters.
    """
    if not isinstance(param, DTensor):
        return view
    return DTensor.from_local(
        view, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


class FlatState:
    """The fused buckets of one optimizer and everything stored per bucket.

    ``optimizer`` is read, never replaced: its ``param_groups`` give the
    layouts and its ``state[p]`` receives the per-parameter views (torch swaps
    both dicts on ``load_state_dict``, so they are looked up on every use).
    Checkpointed through :meth:`section` and :meth:`load`; nothing else here
    is derived state.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        algorithm: str,
        cap_numel: int,
        *,
        element_keys: tuple[str, ...],
        scalar_keys: tuple[str, ...],
        error_keys: tuple[str, ...],
    ) -> None:
        self._opt = optimizer
        self.algorithm = algorithm
        self.cap_numel = cap_numel
        self.element_keys, self.scalar_keys, self.error_keys = element_keys, scalar_keys, error_keys
        self._layouts: list[FlatLayout] | None = None
        self._flats: dict[tuple[int, str], torch.Tensor] = {}
        self.server: dict[int, torch.Tensor] = {}
        """This rank's chunk of each bucket's server error, by bucket index (made by the first 1-bit exchange)."""
        self.scalars: dict[int, dict[str, float]] = {}
        """Per-bucket Python floats of the algorithm (0/1 Adam's interval sums), by bucket index."""

    @property
    def layouts(self) -> list[FlatLayout]:
        """The fused buckets, in communication order; built from the parameter groups on first use."""
        if self._layouts is None:
            self._layouts = build_layouts(self._opt.param_groups, self.cap_numel)
        return self._layouts

    @property
    def started(self) -> bool:
        """Whether any flat buffer exists (the buckets can no longer change)."""
        return bool(self._flats)

    def regroup(self) -> None:
        """Forget the layouts, for a new parameter group (only before any buffer exists)."""
        self._layouts = None

    def buffer(self, layout: FlatLayout, key: str) -> torch.Tensor:
        """The bucket's flat fp32 buffer for ``key``, made on first use (zeros, or the loaded per-parameter state)."""
        flat = self._flats.get((layout.index, key))
        if flat is None:
            flat = torch.zeros(layout.numel, dtype=torch.float32, device=layout.device)
            for p, view in zip(layout.owners, layout.views(flat)):
                loose = self._opt.state[p].get(key)
                if loose is not None:
                    view.copy_(local(loose).reshape(view.shape))
                self._opt.state[p][key] = like_param(view, p)
            self._flats[(layout.index, key)] = flat
        return flat

    def existing(self, layout: FlatLayout, key: str) -> torch.Tensor | None:
        """The bucket's buffer for ``key`` if it was made, without making it."""
        return self._flats.get((layout.index, key))

    # -- checkpoints ------------------------------------------------------------------------

    def section(self, *, config: dict[str, Any], world: int, rank: int, step: int) -> dict[str, Any]:
        """The ``distcomp`` section of ``state_dict()`` (see the module docstring)."""
        return {
            "format": FORMAT,
            "algorithm": self.algorithm,
            "config": config,
            "world_size": world,
            "rank": rank,
            "step": step,
            "buckets": [
                {
                    "params": list(layout.ids),
                    "server_error": self.server[layout.index].clone() if layout.index in self.server else None,
                    "scalars": dict(self.scalars.get(layout.index, {})),
                }
                for layout in self.layouts
            ],
        }

    def check(
        self, state_dict: dict[str, Any], *, config: dict[str, Any], world: int, rank: int, reset_errors: bool
    ) -> dict[str, Any]:
        """The checkpoint's ``distcomp`` section, once it is known to fit this optimizer, job and rank."""
        section = state_dict.get("distcomp") if isinstance(state_dict, dict) else None
        if not isinstance(section, dict) or section.get("format") != FORMAT:
            raise CheckpointError(
                f"{self.algorithm}: not a distcomp optimizer state (no 'distcomp' section of "
                f"format {FORMAT!r}); it may be a torch.optim or DeepSpeed checkpoint"
            )
        if section["algorithm"] != self.algorithm:
            raise CheckpointError(f"{self.algorithm}: the checkpoint is a {section['algorithm']} state")
        diffs = {
            k: (section["config"].get(k), config.get(k))
            for k in config.keys() | section["config"].keys()
            if section["config"].get(k) != config.get(k)
        }
        if diffs:
            raise CheckpointError(f"{self.algorithm}: checkpoint was written with other options: {diffs} (saved, now)")
        if reset_errors:
            return section
        if section["world_size"] != world:
            raise CheckpointError(
                f"{self.algorithm}: checkpoint was written by a job of {section['world_size']} ranks, this one has "
                f"{world}: worker and server errors are per rank and per chunk of the world and cannot be "
                "redistributed; resume with the same world size, or pass reset_errors=True to restart the errors"
            )
        if section["rank"] != rank:
            raise CheckpointError(
                f"{self.algorithm}: checkpoint was written by rank {section['rank']} but this is "
                f"rank {rank}: error buffers differ between ranks; load each rank's own file"
            )
        return section

    def load(self, saved: dict[Any, dict[str, Any]], section: dict[str, Any], reset_errors: bool) -> None:
        """Replace everything with a checked checkpoint's ``state`` and ``distcomp`` section.

        Call it after torch has loaded the ``param_groups`` with an empty
        ``state``; with ``reset_errors`` the error keys and server errors are
        left out, so they start again from zero.
        """
        self._layouts, self._flats, self.scalars = None, {}, {}
        self.server.clear()  # in place: the optimizer's exchange keeps its server errors in this dict
        layouts = self.layouts
        ids = [list(b["params"]) for b in section["buckets"]]
        if ids != [list(layout.ids) for layout in layouts]:
            raise CheckpointError(
                f"{self.algorithm}: the checkpoint's fused buckets {ids} differ from this optimizer's "
                f"{[list(layout.ids) for layout in layouts]}: other parameters, groups, dtypes or bucket_cap_mb"
            )
        self._load_params(saved, reset_errors)
        for layout, bucket in zip(layouts, section["buckets"]):
            for key in self.element_keys:
                if any(key in self._opt.state[p] for p in layout.owners):
                    self.buffer(layout, key)
            if bucket["server_error"] is not None and not reset_errors:
                self.server[layout.index] = bucket["server_error"].detach().to(torch.float32, copy=True)
            self.scalars[layout.index] = {k: float(v) for k, v in bucket["scalars"].items()}

    def _load_params(self, saved: dict[Any, dict[str, Any]], reset_errors: bool) -> None:
        """Per-parameter state into ``optimizer.state`` (fp32, on the parameter's device), checked key by key."""
        params = [p for g in self._opt.param_groups for p in g["params"]]
        by_index = dict(enumerate(params))
        for index, entries in saved.items():
            p = by_index.get(int(index))
            if p is None:
                raise CheckpointError(
                    f"{self.algorithm}: the checkpoint has state for parameter {index}, "
                    f"which this optimizer does not have"
                )
            for key, value in entries.items():
                if key in self.element_keys:
                    value, shard = local(value), local(p)
                    if value.numel() != shard.numel():
                        raise CheckpointError(
                            f"{self.algorithm}: state {key!r} of parameter {index} has "
                            f"{value.numel()} values, the parameter {shard.numel()} ({tuple(shard.shape)})"
                            + (" on this rank: load it with the same sharding" if shard is not p else "")
                        )
                    if not (reset_errors and key in self.error_keys):
                        self._opt.state[p][key] = value.detach().to(device=p.device, dtype=torch.float32, copy=True)
                elif key in self.scalar_keys:
                    self._opt.state[p][key] = float(value)
                else:
                    raise CheckpointError(f"{self.algorithm}: unknown state {key!r} for parameter {index}")
