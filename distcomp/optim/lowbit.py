"""Optimizer state in low precision: one flat fp32 buffer kept as bf16 or as block-quantized codes.

A step decodes a bucket's state into fp32 scratch, computes exactly as with
fp32 state, and encodes the result again (:class:`~distcomp.optim.state.FlatState`
does both around each bucket). Two quantizers, because the two moments need
different things:

* **Momentum** (signed): blocks of :data:`BLOCK` values share one fp32 scale
  ``absmax / qmax`` and the values are rounded to the nearest of the symmetric
  integer levels (:func:`distcomp.kernels.quant.quantize_codes`: Triton on CUDA,
  the torch reference elsewhere). Before quantizing, the momentum is companded
  to ``sign(m) sqrt(|m|)`` (decoded as ``d |d|``): the levels crowd near zero,
  where most of a block's values are (a linear int4 grid puts nearly all of
  them at 0 or +-absmax/7).
* **Variance** (non-negative, a denominator): a zero-point-free grid (Li et al.,
  2023, "Memory Efficient Optimizers with 4-bit States"). With a grid that
  contains zero, the small variances of a block round to 0, and ``m / sqrt(v)``
  explodes for exactly those elements. Here ``sqrt(v)`` is stored (the
  denominator itself, at half the dynamic range of ``v``) on the levels
  ``(q + 1) / 2**bits * blockmax``, ``q = 0 .. 2**bits - 1``: the smallest value
  a block can hold is ``blockmax / 2**bits`` (256 or 16 times below its
  largest), so a small variance is overestimated and its step shrinks rather
  than explodes. A block whose values are all zero decodes to zeros (as fp32
  state would hold), never to NaN or inf.

Rounding is deterministic (to nearest), so a run resumed from a checkpoint of
the codes continues bit for bit. Error-feedback buffers never pass through here:
they hold the compression error itself, which a second lossy code would feed
back wrongly; they stay fp32.

:class:`QuantizedBuffer` takes any flat length, so the same store serves a
fused bucket of whole parameters or a rank's shard of one.
"""

from __future__ import annotations

from typing import Literal

import torch

from distcomp.kernels.quant import dequantize_codes, pack_int4, quantize_codes, unpack_int4

StateDtype = Literal["fp32", "bf16", "int8", "int4"]
"""How the momentum and the variance are stored between steps."""
Role = Literal["momentum", "variance"]
"""Which quantizer a buffer uses."""

STATE_DTYPES: tuple[str, ...] = ("fp32", "bf16", "int8", "int4")
BITS = {"int8": 8, "int4": 4}
BLOCK = {8: 256, 4: 128}
"""Values per fp32 scale, by bits. Measured on the Adam state of a small MLP after 200 steps (relative error of
``m / sqrt(v)`` for blocks 64/128/256/512): int8 0.69/0.73/0.77/0.83 %, int4 12.3/13.1/13.8/15.0 %. 256 for 8 bits
costs 1/64 byte per value (torchao's 8-bit block too); 128 for 4 bits costs 1/32 (the 4-bit paper's block)."""


def padded(numel: int, bits: int) -> int:
    """``numel`` rounded up to whole blocks."""
    block = BLOCK[bits]
    return -(-numel // block) * block


# -- momentum: signed, companded, on the kernels' block quantizer ----------------------------


def quantize_momentum_(x: torch.Tensor, bits: int, out: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Codes of the flat fp32 ``x`` (whole blocks long) into ``out = (codes, scales)``; ``x`` is overwritten."""
    torch.copysign(x.abs().sqrt_(), x, out=x)
    codes, scales = out
    quantize_codes(x.view(1, -1), bits, BLOCK[bits], out=(codes.view(1, -1), scales.view(1, -1)))


def dequantize_momentum(codes: torch.Tensor, scales: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Inverse of :func:`quantize_momentum_` into the flat fp32 ``out`` (whole blocks long)."""
    dequantize_codes(codes.view(1, -1), scales.view(1, -1), bits, BLOCK[bits], out=out)
    out.mul_(out.abs())


# -- variance: unsigned, zero-point-free levels of sqrt(v) ------------------------------------


def quantize_variance_(v: torch.Tensor, bits: int, out: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Codes of the flat non-negative fp32 ``v`` (whole blocks long) into ``out = (codes, steps)``; ``v`` is
    overwritten. ``steps`` holds each block's ``max(sqrt(v)) / 2**bits``; code ``q`` means ``(q + 1) * step``."""
    codes, steps = out
    levels = 1 << bits
    root = v.sqrt_().view(steps.numel(), -1)
    torch.amax(root, dim=-1, out=steps).div_(levels)
    # An all-zero block has step 0: divide by 1 instead, every code is then 0 and decodes to 0 * 0.
    root.div_(torch.where(steps > 0, steps, 1.0).unsqueeze(-1)).round_().clamp_(1, levels).sub_(1)
    if bits == 8:
        codes.copy_(v)
    else:
        codes.copy_(pack_int4(v.sub_(8).to(torch.int8).view(1, -1)).view(-1))


def dequantize_variance(codes: torch.Tensor, steps: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Inverse of :func:`quantize_variance_` into the flat fp32 ``out`` (whole blocks long): ``((q + 1) step)**2``."""
    if bits == 8:
        out.copy_(codes).add_(1)
    else:
        out.copy_(unpack_int4(codes.view(1, -1)).view(-1)).add_(9)
    root = out.view(steps.numel(), -1).mul_(steps.unsqueeze(-1))
    root.mul_(root)


# -- the store ---------------------------------------------------------------------------------


class QuantizedBuffer:
    """A flat fp32 buffer of ``numel`` values kept as bf16 values, or as codes and per-block fp32 scales.

    ``decode(out)`` writes the values into fp32 ``out`` (:meth:`scratch_numel`
    long: whole blocks; past ``numel`` is padding, as decoded); ``encode(src)``
    stores them again from such a buffer, overwriting ``src``. Starts at zeros.
    Checkpointed through :meth:`tensors` and :meth:`load`.
    """

    def __init__(self, numel: int, role: Role, dtype: StateDtype, device: torch.device) -> None:
        if dtype not in ("bf16", "int8", "int4"):
            raise ValueError(f"QuantizedBuffer: dtype must be bf16, int8 or int4, got {dtype!r}")
        self.numel, self.role, self.dtype = numel, role, dtype
        self.bits = BITS.get(dtype, 16)
        if dtype == "bf16":
            self._tensors = {"values": torch.zeros(numel, dtype=torch.bfloat16, device=device)}
        else:
            length = padded(numel, self.bits)
            self._tensors = {
                "codes": torch.zeros(length * self.bits // 8, dtype=torch.uint8, device=device),
                "scales": torch.zeros(length // BLOCK[self.bits], dtype=torch.float32, device=device),
            }

    @property
    def scratch_numel(self) -> int:
        """Length of the fp32 buffer :meth:`decode` and :meth:`encode` take."""
        return self.numel if self.dtype == "bf16" else padded(self.numel, self.bits)

    @property
    def nbytes(self) -> int:
        """Bytes held between steps."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def decode(self, out: torch.Tensor) -> torch.Tensor:
        """The values, into fp32 ``out``; returns ``out[:numel]``."""
        if self.dtype == "bf16":
            out.copy_(self._tensors["values"])
        elif self.role == "momentum":
            dequantize_momentum(self._tensors["codes"], self._tensors["scales"], self.bits, out)
        else:
            dequantize_variance(self._tensors["codes"], self._tensors["scales"], self.bits, out)
        return out[: self.numel]

    def encode(self, src: torch.Tensor) -> None:
        """Store fp32 ``src`` (:meth:`decode`'s buffer, its padding left as decoded); overwrites it."""
        if self.dtype == "bf16":
            self._tensors["values"].copy_(src)
            return
        out = (self._tensors["codes"], self._tensors["scales"])
        if self.role == "momentum":
            quantize_momentum_(src, self.bits, out)
        else:
            quantize_variance_(src, self.bits, out)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors (copies), for a checkpoint."""
        return {k: t.clone() for k, t in self._tensors.items()}

    def load(self, saved: dict[str, torch.Tensor], what: str) -> None:
        """Restore :meth:`tensors` bit for bit; ``what`` names the buffer in the error."""
        if saved.keys() != self._tensors.keys() or any(
            saved[k].dtype != t.dtype or saved[k].shape != t.shape for k, t in self._tensors.items()
        ):
            got = {k: (v.dtype, tuple(v.shape)) for k, v in saved.items()}
            want = {k: (v.dtype, tuple(v.shape)) for k, v in self._tensors.items()}
            raise ValueError(f"{what}: saved {got}, this optimizer holds {want}")
        for k, t in self._tensors.items():
            t.copy_(saved[k])
