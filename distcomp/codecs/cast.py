"""Half-precision casts: the values themselves in float16 or bfloat16, which add up like fp32."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CastCodec:
    """Tensors sent in ``dtype`` (half the bytes of fp32)."""

    dtype: torch.dtype
    """The wire dtype: ``torch.float16`` or ``torch.bfloat16``."""

    def encode(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` rounded to the wire dtype (into ``out`` if given)."""
        return x.to(self.dtype) if out is None else out.copy_(x)

    def decode(self, payload: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The payload's values in ``out``'s dtype; returns ``out``."""
        return out.copy_(payload)

    def decode_add(self, payload: torch.Tensor, out: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``out += alpha * payload``; returns ``out``."""
        return out.add_(payload, alpha=alpha)
