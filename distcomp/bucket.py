"""A flat gradient buffer and the named parameters laid out in it.

Compressors see this instead of torch's ``GradBucket`` so that they never
import DDP or FSDP, and so that every piece of state can be keyed by parameter
name: DDP rebuilds its buckets after the first iteration, so bucket indices are
not stable.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class Bucket:
    """One flat 1-D gradient buffer holding the parameters ``names`` at ``offsets``."""

    buffer: torch.Tensor
    """Flat 1-D gradients; compressors may overwrite it."""
    names: tuple[str, ...]
    """Parameter names in buffer order."""
    shapes: tuple[torch.Size, ...]
    """Parameter shapes, same order."""
    offsets: tuple[int, ...]
    """Element offset of each parameter in ``buffer``."""
    index: int = 0
    """Position of the bucket in this step's sequence of buckets."""

    def __post_init__(self) -> None:
        if self.buffer.dim() != 1:
            raise ValueError(f"a bucket buffer must be 1-D, got shape {tuple(self.buffer.shape)}")
        if not (len(self.names) == len(self.shapes) == len(self.offsets)):
            raise ValueError("names, shapes and offsets must have the same length")

    @classmethod
    def from_tensors(cls, named: list[tuple[str, torch.Tensor]], index: int = 0) -> Bucket:
        """Pack ``named`` tensors into a new contiguous buffer (used by tests, FSDP and optimizers)."""
        flat = torch.cat([t.reshape(-1) for _, t in named]) if named else torch.empty(0)
        offsets, pos = [], 0
        for _, t in named:
            offsets.append(pos)
            pos += t.numel()
        return cls(flat, tuple(n for n, _ in named), tuple(t.shape for _, t in named), tuple(offsets), index)

    @property
    def numel(self) -> int:
        return self.buffer.numel()

    @cached_property
    def key(self) -> tuple[str, ...]:
        """Identifies the layout: the same parameters in the same order."""
        return self.names

    def numels(self) -> list[int]:
        return [s.numel() for s in self.shapes]

    def select(self, names: tuple[str, ...]) -> list[tuple[str, torch.Tensor]]:
        """``(name, view)`` pairs of the buffer for ``names``, in that order."""
        where = {n: i for i, n in enumerate(self.names)}
        flat = self.buffer
        out = []
        for name in names:
            i = where[name]
            out.append((name, flat[self.offsets[i] : self.offsets[i] + self.shapes[i].numel()].view(self.shapes[i])))
        return out

    def subset(self, names: tuple[str, ...], index: int = 0) -> Bucket:
        """A new bucket holding copies of ``names``' gradients, contiguous, in that order."""
        return Bucket.from_tensors(self.select(names), index=index)

    def views(self, flat: torch.Tensor | None = None) -> list[tuple[str, torch.Tensor]]:
        """``(name, view)`` pairs into ``flat`` (default: the buffer) with each parameter's shape."""
        flat = self.buffer if flat is None else flat
        return [
            (name, flat[off : off + shape.numel()].view(shape))
            for name, shape, off in zip(self.names, self.shapes, self.offsets)
        ]
