"""The benchmarks' training data and replica digests: real text with no download, batches that depend only on
(rank, step), and a digest that is equal on every rank exactly when the replicas agree bit for bit."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def corpus() -> torch.Tensor:
    """Bytes of the help text that ships with Python: real text, no download."""
    from pydoc_data.topics import topics

    text = "".join(topics.values()).encode("utf-8")
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def batch(data: torch.Tensor, rank: int, step: int, size: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch that depends only on (rank, step): every method sees the same data."""
    g = torch.Generator().manual_seed(1_000 * step + rank)
    starts = torch.randint(0, data.numel() - context - 1, (size,), generator=g)
    idx = torch.stack([data[s : s + context + 1] for s in starts.tolist()])
    return idx[:, :-1], idx[:, 1:]


def param_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's bytes: equal on every rank exactly when the replicas agree bit for bit.

    A sharded (DTensor) parameter is gathered whole first: a collective, so every rank calls this together."""
    full = [getattr(p.detach(), "full_tensor", p.detach)() for p in model.parameters()]
    flat = torch.cat([p.reshape(-1).cpu() for p in full])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()
