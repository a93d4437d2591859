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

With ``state_dtype`` other than ``"fp32"`` the momentum and variance keys are
kept per bucket in a :class:`~distcomp.optim.lowbit.QuantizedBuffer` (bf16
values, or codes and per-block scales whose blocks span the bucket), not in
``state[p]``: a step opens a bucket's buffer into fp32 scratch shared by all
buckets, computes, and stores it again (:meth:`FlatState.buffer`,
:meth:`FlatState.commit`). The checkpoint holds them as they are stored, in the
bucket's entry: ``"lowbit": {"exp_avg": {"codes": ..., "scales": ...}, ...}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from distcomp.errors import CheckpointError
from distcomp.optim.layout import FlatLayout, build_layouts, local
from distcomp.optim.lowbit import QuantizedBuffer, Role, StateDtype

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


@dataclass
class _Opened:
    """A low-bit buffer decoded into scratch for the bucket being computed."""

    index: int
    store: QuantizedBuffer
    scratch: torch.Tensor
    values: torch.Tensor
    dirty: bool


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
        state_dtype: StateDtype = "fp32",
        lowbit_keys: dict[str, Role] | None = None,
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
        self.state_dtype = state_dtype
        self.lowbit: dict[str, Role] = dict(lowbit_keys or {}) if state_dtype != "fp32" else {}
        """The keys kept in low precision, with the quantizer each uses (empty with fp32 state)."""
        self._stores: dict[tuple[int, str], QuantizedBuffer] = {}
        self._opened: dict[str, _Opened] = {}
        self._scratch: dict[str, torch.Tensor] = {}

    @property
    def layouts(self) -> list[FlatLayout]:
        """The fused buckets, in communication order; built from the parameter groups on first use."""
        if self._layouts is None:
            self._layouts = build_layouts(self._opt.param_groups, self.cap_numel)
        return self._layouts

    @property
    def started(self) -> bool:
        """Whether any flat buffer exists (the buckets can no longer change)."""
        return bool(self._flats) or bool(self._stores)

    def regroup(self) -> None:
        """Forget the layouts, for a new parameter group (only before any buffer exists)."""
        self._layouts = None

    def buffer(self, layout: FlatLayout, key: str, write: bool = True) -> torch.Tensor:
        """The bucket's flat fp32 buffer for ``key``, made on first use (zeros, or the loaded per-parameter state).

        A low-bit key gives fp32 scratch holding the decoded values, valid until
        another bucket's buffer of the same key is asked for or :meth:`commit`;
        changes are stored then, unless every use said ``write=False``.
        """
        if key in self.lowbit:
            return self._open(layout, key, write)
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
        """The bucket's fp32 buffer for ``key`` if it was made, without making it (not for low-bit keys)."""
        return self._flats.get((layout.index, key))

    # -- low-bit state ----------------------------------------------------------------------

    def _open(self, layout: FlatLayout, key: str, write: bool) -> torch.Tensor:
        """Decode the bucket's low-bit ``key`` into the key's scratch (storing the bucket open there before)."""
        opened = self._opened.get(key)
        if opened is None or opened.index != layout.index:
            if opened is not None:
                self._close(key)
            store = self._store(layout, key)
            scratch = self._scratch.get(key)
            if scratch is None or scratch.numel() < store.scratch_numel or scratch.device != layout.device:
                scratch = torch.empty(store.scratch_numel, dtype=torch.float32, device=layout.device)
                self._scratch[key] = scratch
            scratch = scratch[: store.scratch_numel]
            opened = _Opened(layout.index, store, scratch, store.decode(scratch), dirty=False)
            self._opened[key] = opened
        opened.dirty |= write
        return opened.values

    def _store(self, layout: FlatLayout, key: str) -> QuantizedBuffer:
        store = self._stores.get((layout.index, key))
        if store is None:
            store = QuantizedBuffer(layout.numel, self.lowbit[key], self.state_dtype, layout.device)
            self._stores[(layout.index, key)] = store
        return store

    def _close(self, key: str) -> None:
        opened = self._opened.pop(key)
        if opened.dirty:
            opened.store.encode(opened.scratch)

    def commit(self) -> None:
        """Store every open low-bit buffer (the optimizer calls it at the end of each step)."""
        for key in list(self._opened):
            self._close(key)

    def nbytes(self) -> dict[str, int]:
        """Bytes of state held between steps, by key (server errors as ``"server_error"``); scratch not counted."""
        out: dict[str, int] = {}
        for (_, key), flat in self._flats.items():
            out[key] = out.get(key, 0) + flat.numel() * flat.element_size()
        for (_, key), store in self._stores.items():
            out[key] = out.get(key, 0) + store.nbytes
        served = sum(t.numel() * t.element_size() for t in self.server.values())
        if served:
            out["server_error"] = served
        return out

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
                    **({"lowbit": self._lowbit_section(layout)} if self.lowbit else {}),
                }
                for layout in self.layouts
            ],
        }

    def _lowbit_section(self, layout: FlatLayout) -> dict[str, dict[str, torch.Tensor]]:
        self.commit()
        return {
            key: store.tensors() for key in self.lowbit if (store := self._stores.get((layout.index, key))) is not None
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
        saved_config = {"state_dtype": "fp32", **section["config"]}  # checkpoints older than state_dtype: fp32
        saved_dtype, dtype = saved_config["state_dtype"], config.get("state_dtype", "fp32")
        if saved_dtype != dtype:
            raise CheckpointError(
                f"{self.algorithm}: the checkpoint holds state_dtype={saved_dtype!r} optimizer state, this optimizer "
                f"was built with state_dtype={dtype!r}; build it with state_dtype={saved_dtype!r} to resume "
                "(low-bit state is saved as its codes and is not converted)"
            )
        diffs = {
            k: (saved_config.get(k), config.get(k))
            for k in config.keys() | saved_config.keys()
            if saved_config.get(k) != config.get(k)
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
                f"rank {rank}: error buffers differ between ranks; load each rank's own file, or, from a single "
                "file every rank loads (rank 0's), pass reset_errors=True to keep the moments and the step and "
                "restart this rank's errors"
            )
        return section

    def load(self, saved: dict[Any, dict[str, Any]], section: dict[str, Any], reset_errors: bool) -> None:
        """Replace everything with a checked checkpoint's ``state`` and ``distcomp`` section.

        Call it after torch has loaded the ``param_groups`` with an empty
        ``state``; with ``reset_errors`` the error keys and server errors are
        left out, so they start again from zero.
        """
        self._layouts, self._flats, self.scalars = None, {}, {}
        self._stores, self._opened = {}, {}
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
                if key not in self.lowbit and any(key in self._opt.state[p] for p in layout.owners):
                    self.buffer(layout, key)
            for key, saved_store in bucket.get("lowbit", {}).items():
                if key not in self.lowbit:
                    raise CheckpointError(f"{self.algorithm}: unknown low-bit state {key!r} in bucket {layout.index}")
                try:
                    self._store(layout, key).load(
                        saved_store, f"{self.algorithm}: low-bit {key!r} of bucket {layout.index}"
                    )
                except ValueError as e:
                    raise CheckpointError(str(e)) from None
            if bucket["server_error"] is not None and not reset_errors:
                self.server[layout.index] = bucket["server_error"].detach().to(torch.float32, copy=True)
            if bucket["scalars"]:  # none saved before the algorithm made them: it makes them again on first use
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
                if key in self.element_keys and key not in self.lowbit:
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
