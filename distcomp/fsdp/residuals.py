"""Worker residuals held as int8 blocks: ``error_feedback="int8"`` of ``distcomp.fsdp.register``.

An FSDP2 worker residual is as large as its unit's unsharded gradient, so fp32
residuals give back much of what sharding saves. Here each parameter's residual
rows (``[world_size, padded shard]``) are kept as int8 codes, one fp32 scale per
block of :data:`BLOCK` values (``absmax / 127``): 1 + 4/128 = 1.03 bytes per
element instead of 4, in the spirit of MicroAdam's compressed error feedback.
The error this adds is not fed back. ``distcomp.fsdp`` rounds stochastically
from a seeded per-rank generator (unbiased, at most one step ``absmax / 127`` per
value; a run stays reproducible): with topk, whose residuals hold most of the
gradient, rounding to nearest (at most half a step, but biased: a value below
half a step of its block is dropped every step) trained measurably worse.

Quantization is per parameter slot (rows padded with zeros to whole blocks), so
a checkpoint keeps its residuals keyed by parameter name and holds the codes and
scales exactly: dequantizing and quantizing again is not the identity, which a
bit-identical resume needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from distcomp.errors import CheckpointError
from distcomp.fsdp.modules import ParamSlot
from distcomp.kernels import dequantize_blockwise, quantize_blockwise

__all__ = ["BLOCK", "QuantizedRows", "dequantize_unit", "quantize_unit"]

BLOCK = 128
"""Values per fp32 scale: 4/128 bytes of scale per value."""


def _padded(numel: int) -> int:
    return -(-numel // BLOCK) * BLOCK


@dataclass(frozen=True)
class QuantizedRows:
    """One parameter's residual rows ``[world_size, numel]`` as int8 ``codes`` and fp32 block ``scales``."""

    codes: torch.Tensor
    """int8 ``[world_size, numel padded to whole blocks]``."""
    scales: torch.Tensor
    """fp32 ``[world_size, blocks]``: a block's values are ``codes * scale``."""
    numel: int
    """Values per row before padding."""

    @classmethod
    def quantize(cls, rows: torch.Tensor, generator: torch.Generator | None = None) -> QuantizedRows:
        """Quantize fp32 ``rows [world_size, numel]``; an all-zero block gets scale 0.

        Rounds to nearest, or stochastically with draws from ``generator``.
        """
        numel = rows.shape[1]
        padded = rows if _padded(numel) == numel else F.pad(rows, (0, _padded(numel) - numel))
        codes, scales = quantize_blockwise(padded.contiguous(), 8, BLOCK, generator)
        return cls(codes, scales, numel)

    def dequantize(self) -> torch.Tensor:
        """fp32 ``[world_size, numel]``."""
        return dequantize_blockwise(self.codes, self.scales, BLOCK).view(self.codes.shape)[:, : self.numel]

    @property
    def nbytes(self) -> int:
        """Bytes held: codes and scales."""
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the codes and scales, exactly as held."""
        return {"codes": self.codes.clone(), "scales": self.scales.clone()}

    @classmethod
    def from_state_dict(cls, entry: object, world_size: int, numel: int, name: str) -> QuantizedRows:
        """Rows saved by :meth:`state_dict` for parameter ``name``; a wrong type or shape is a CheckpointError."""
        blocks = _padded(numel) // BLOCK
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("codes"), torch.Tensor)
            and isinstance(entry.get("scales"), torch.Tensor)
            and entry["codes"].dtype == torch.int8
            and entry["scales"].dtype == torch.float32
            and tuple(entry["codes"].shape) == (world_size, blocks * BLOCK)
            and tuple(entry["scales"].shape) == (world_size, blocks)
        )
        if not ok:
            raise CheckpointError(
                f"the int8 residual of parameter {name!r} is not int8 codes [{world_size}, {blocks * BLOCK}] with "
                f"fp32 scales [{world_size}, {blocks}]: the checkpoint was written for another model, sharding "
                "or error-feedback mode; resume with the same model, mesh and error_feedback"
            )
        assert isinstance(entry, dict)  # for the type checker: checked above
        return cls(entry["codes"].contiguous(), entry["scales"].contiguous(), numel)


def quantize_unit(
    residual: torch.Tensor, slots: Sequence[ParamSlot], generator: torch.Generator | None = None
) -> tuple[QuantizedRows, ...]:
    """A unit's fp32 residual ``[world_size, shard]`` as one :class:`QuantizedRows` per parameter slot."""
    return tuple(QuantizedRows.quantize(residual[:, s.offset : s.offset + s.numel], generator) for s in slots)


def dequantize_unit(
    parts: Sequence[QuantizedRows], slots: Sequence[ParamSlot], world_size: int, device: torch.device
) -> torch.Tensor:
    """Inverse of :func:`quantize_unit`: fp32 ``[world_size, shard]`` on ``device``."""
    out = torch.empty(world_size, sum(s.numel for s in slots), dtype=torch.float32, device=device)
    for part, slot in zip(parts, slots, strict=True):
        out[:, slot.offset : slot.offset + slot.numel] = part.dequantize().to(device)
    return out
