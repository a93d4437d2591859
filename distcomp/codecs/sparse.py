"""Sparse payloads: top-k values with their indices, and random-k values alone.

Top-k entries differ between ranks, so each payload carries its indices and
payloads are gathered, then scatter-added. Random-k indices come from a
generator seeded alike on every rank, so only the values travel and payloads
add up like dense tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distcomp.kernels import topk_pack, topk_scatter_add


@dataclass(frozen=True)
class TopKCodec:
    """The ``k`` entries of largest magnitude as one int32 payload ``[k values bit-cast to int32 | k indices]``."""

    k: int
    """Entries kept per payload."""

    def payload_numel(self) -> int:
        """int32 words of one payload."""
        return 2 * self.k

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The payload of flat ``x`` (any float dtype; values are sent as fp32)."""
        return topk_pack(x, self.k)

    def decode(self, payload: torch.Tensor, length: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense fp32 tensor of ``length`` values that ``payload`` stands for (zero elsewhere; into ``out``)."""
        out = torch.empty(length, dtype=torch.float32, device=payload.device) if out is None else out
        return self.decode_add(payload, out.zero_())

    def decode_add(self, payload: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Add every payload row of ``payload [rows, 2k]`` (or one ``[2k]``) into flat fp32 ``out``; returns ``out``."""
        return topk_scatter_add(out, payload if payload.dim() == 2 else payload.view(1, -1))


@dataclass(frozen=True)
class RandomKCodec:
    """The values at ``indices``; every rank draws the same indices, so payloads add up.

    An index may repeat: it then sends the same value twice, and decoding
    writes (rather than accumulates) each index, so a repeat changes nothing.
    """

    indices: torch.Tensor
    """int64 positions of the sent entries, on the data's device."""

    @classmethod
    def draw(cls, n: int, k: int, generator: torch.Generator, device: torch.device) -> RandomKCodec:
        """``k`` indices below ``n`` from ``generator`` (a CPU generator seeded alike on every rank)."""
        # With replacement: O(k), where a permutation is O(n).
        return cls(torch.randint(n, (k,), generator=generator).to(device))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The payload of flat ``x``: its values at the indices."""
        return x[self.indices]

    def decode(self, payload: torch.Tensor, length: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense fp32 tensor of ``length`` values that ``payload`` stands for (zero elsewhere; into ``out``)."""
        out = torch.empty(length, dtype=torch.float32, device=payload.device) if out is None else out
        return out.zero_().index_copy_(0, self.indices, payload)

    def decode_add(self, payload: torch.Tensor, out: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``out += alpha * decode(payload)`` for flat ``out``; returns ``out``."""
        return out.index_copy_(0, self.indices, out[self.indices].add_(payload, alpha=alpha))
