"""Reusable scratch buffers.

A fresh multi-megabyte CPU tensor is page-faulted in on first touch, which
costs several times the arithmetic done on it; compressors therefore keep
their scratch space between steps. Buffers are keyed by purpose; a compressor
handles one bucket at a time, so one buffer per purpose suffices.
"""

from __future__ import annotations

import torch


class Workspace:
    """Scratch tensors by name, grown on demand and kept between calls (not checkpointed)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A 1-D tensor of ``numel`` elements with undefined content; valid until the next ``get(name, ...)``."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:numel]

    def zeros(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Like :meth:`get`, filled with zeros."""
        return self.get(name, numel, dtype, device).zero_()
