"""Fused buckets of optimizer state: many parameters, one flat fp32 buffer per state key.

A step compresses the momentum of every parameter of a bucket in one two-phase
all-reduce, instead of one per tensor (DeepSpeed's 1-bit Adam spent most of its
step in 76 small compressed all-reduces). A bucket holds parameters of one
parameter group (so the hyperparameters are scalars for the whole bucket), one
device and one dtype, in the group's order, up to a size cap. The layout is a
pure function of the parameter groups, so every rank and every resumed run
builds the same buckets.

Parameters sharded by FSDP2 are ``DTensor``s: a layout holds each one's local
shard (what the step reads and writes, in place) and keeps the ``DTensor``
itself as the key of the optimizer's state. Buckets are cut by the parameters'
global sizes, so every rank builds the same buckets from its own shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor


@dataclass(frozen=True, eq=False)
class FlatLayout:
    """Parameters laid out back to back in one flat buffer."""

    index: int
    """Position of the bucket in every step's sequence of collectives."""
    group: int
    """Index of the parameter group the parameters belong to."""
    params: tuple[torch.Tensor, ...]
    """The tensors a step updates, in group order: the parameters, or their local shards under FSDP."""
    owners: tuple[torch.Tensor, ...]
    """The optimizer's parameters themselves (the keys of ``optimizer.state``, holders of ``.grad``)."""
    ids: tuple[int, ...]
    """Their indices in ``optimizer.state_dict()`` numbering."""
    offsets: tuple[int, ...]
    """Element offset of each parameter in the flat buffer."""
    numel: int
    """Total elements."""

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter views of ``flat``, each shaped like its parameter."""
        return [flat[o : o + p.numel()].view(p.shape) for o, p in zip(self.offsets, self.params)]

    def numels(self) -> list[int]:
        """Global sizes of the parameters (the same on every rank, sharded or not)."""
        return [p.numel() for p in self.owners]

    @property
    def sharded(self) -> bool:
        """Whether the parameters are FSDP shards (``DTensor``s)."""
        return any(isinstance(p, DTensor) for p in self.owners)


def local(t: torch.Tensor) -> torch.Tensor:
    """A ``DTensor``'s local shard (the same storage), or the tensor itself."""
    return t._local_tensor if isinstance(t, DTensor) else t


def state_dict_ids(param_groups: Sequence[dict[str, Any]]) -> dict[int, int]:
    """``id(param) -> index`` as ``torch.optim.Optimizer.state_dict`` numbers parameters."""
    ids: dict[int, int] = {}
    start = 0
    for group in param_groups:
        for i, p in enumerate(group["params"], start):
            ids.setdefault(id(p), i)
        start += len(group["params"])
    return ids


def build_layouts(param_groups: Sequence[dict[str, Any]], cap_numel: int) -> list[FlatLayout]:
    """Buckets of the trainable, non-empty parameters: by group, then device and dtype, each at most ``cap_numel``.

    A parameter larger than the cap gets a bucket of its own.
    """
    ids = state_dict_ids(param_groups)
    layouts: list[FlatLayout] = []
    for g, group in enumerate(param_groups):
        by_kind: dict[tuple[torch.device, torch.dtype], list[list[torch.Tensor]]] = {}
        for p in group["params"]:
            if not p.requires_grad or p.numel() == 0:
                continue
            runs = by_kind.setdefault((p.device, p.dtype), [[]])
            if runs[-1] and sum(q.numel() for q in runs[-1]) + p.numel() > cap_numel:
                runs.append([])
            runs[-1].append(p)
        for runs in by_kind.values():
            for owners in runs:
                shards = tuple(local(p) for p in owners)
                offsets, pos = [], 0
                for t in shards:
                    offsets.append(pos)
                    pos += t.numel()
                ids_ = tuple(ids[id(p)] for p in owners)
                layouts.append(FlatLayout(len(layouts), g, shards, tuple(owners), ids_, tuple(offsets), pos))
    return layouts
