"""Checkpoints of the compressed optimizers: exact, per rank, and refused when they cannot be exact.

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

from typing import Any, ClassVar

import torch
import torch.distributed as dist

from distcomp.errors import CheckpointError

FORMAT = "distcomp.optim/1"


class StateMixin:
    """``state_dict`` / ``load_state_dict`` for :class:`~distcomp.optim.base.CompressedOptimizer`."""

    element_keys: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq", "worker_error")
    """Per-element state, kept in flat fp32 buffers."""
    scalar_keys: ClassVar[tuple[str, ...]] = ()
    """Per-parameter Python floats."""
    error_keys: ClassVar[tuple[str, ...]] = ("worker_error",)
    """Per-element state that differs between ranks and is dropped by ``reset_errors``."""

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus this rank's server errors, step and world (see the module docstring)."""
        layouts = self._ensure_layouts()
        out = super().state_dict()  # type: ignore[misc]
        world, rank = (self._world, self._rank) if self._world is not None else _world_now(self)
        out["distcomp"] = {
            "format": FORMAT,
            "algorithm": self.algorithm,
            "config": self.config.trajectory(),
            "world_size": world,
            "rank": rank,
            "step": self._step,
            "buckets": [
                {
                    "params": list(layout.ids),
                    "server_error": self._server[layout.index].clone() if layout.index in self._server else None,
                    "scalars": dict(self._scalars.get(layout.index, {})),
                }
                for layout in layouts
            ],
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any], *, reset_errors: bool = False) -> None:
        """Restore :meth:`state_dict` exactly; raise :class:`CheckpointError` on any mismatch.

        ``reset_errors=True`` allows a checkpoint from another world size or rank:
        the worker and server errors (the only state that differs between ranks)
        start again from zero, everything else is restored. 0/1 Adam additionally
        needs the checkpoint to be at a synchronisation point.
        """
        section = self._check_section(state_dict, reset_errors)
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})  # type: ignore[misc]
        self._layouts, self._flats, self._server, self._scalars, self._denoms = None, {}, {}, {}, {}
        layouts = self._ensure_layouts()
        saved = [list(b["params"]) for b in section["buckets"]]
        if saved != [list(layout.ids) for layout in layouts]:
            raise CheckpointError(
                f"{self.algorithm}: the checkpoint's fused buckets {saved} differ from this optimizer's "
                f"{[list(layout.ids) for layout in layouts]}: other parameters, groups, dtypes or bucket_cap_mb"
            )
        self._load_params(state_dict["state"], reset_errors)
        for layout, bucket in zip(layouts, section["buckets"]):
            for key in self.element_keys:
                if any(key in self.state[p] for p in layout.params):
                    self._flat(layout, key)
            if bucket["server_error"] is not None and not reset_errors:
                self._server[layout.index] = bucket["server_error"].detach().to(torch.float32, copy=True)
            self._scalars[layout.index] = {k: float(v) for k, v in bucket["scalars"].items()}
        self._step = int(section["step"])
        self._after_load(reset_errors)

    def _after_load(self, reset_errors: bool) -> None:
        """Subclass checks once everything is restored."""

    def _check_section(self, state_dict: dict[str, Any], reset_errors: bool) -> dict[str, Any]:
        section = state_dict.get("distcomp") if isinstance(state_dict, dict) else None
        if not isinstance(section, dict) or section.get("format") != FORMAT:
            raise CheckpointError(f"{self.algorithm}: not a distcomp optimizer state (no 'distcomp' section of "
                                  f"format {FORMAT!r}); it may be a torch.optim or DeepSpeed checkpoint")
        if section["algorithm"] != self.algorithm:
            raise CheckpointError(f"{self.algorithm}: the checkpoint is a {section['algorithm']} state")
        mine = self.config.trajectory()
        diffs = {k: (section["config"].get(k), mine.get(k)) for k in mine.keys() | section["config"].keys()
                 if section["config"].get(k) != mine.get(k)}
        if diffs:
            raise CheckpointError(f"{self.algorithm}: checkpoint was written with other options: {diffs} (saved, now)")
        world, rank = _world_now(self)
        if reset_errors:
            return section
        if section["world_size"] != world:
            raise CheckpointError(
                f"{self.algorithm}: checkpoint was written by a job of {section['world_size']} ranks, this one has "
                f"{world}: worker and server errors are per rank and per chunk of the world and cannot be "
                "redistributed; resume with the same world size, or pass reset_errors=True to restart the errors"
            )
        if section["rank"] != rank:
            raise CheckpointError(f"{self.algorithm}: checkpoint was written by rank {section['rank']} but this is "
                                  f"rank {rank}: error buffers differ between ranks; load each rank's own file")
        return section

    def _load_params(self, saved: dict[Any, dict[str, Any]], reset_errors: bool) -> None:
        by_index = {i: p for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for index, entries in saved.items():
            p = by_index.get(int(index))
            if p is None:
                raise CheckpointError(f"{self.algorithm}: the checkpoint has state for parameter {index}, "
                                      f"which this optimizer does not have")
            for key, value in entries.items():
                if key in self.element_keys:
                    if value.numel() != p.numel():
                        raise CheckpointError(f"{self.algorithm}: state {key!r} of parameter {index} has "
                                              f"{value.numel()} values, the parameter {p.numel()} ({tuple(p.shape)})")
                    if not (reset_errors and key in self.error_keys):
                        self.state[p][key] = value.detach().to(device=p.device, dtype=torch.float32, copy=True)
                elif key in self.scalar_keys:
                    self.state[p][key] = float(value)
                else:
                    raise CheckpointError(f"{self.algorithm}: unknown state {key!r} for parameter {index}")


def world_of(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(world size, rank)`` of ``group``; ``(1, 0)`` when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _world_now(opt: Any) -> tuple[int, int]:
    return world_of(opt.process_group)
