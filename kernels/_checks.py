"""Input validation, and small helpers, shared by the public ops and launchers."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(x: torch.Tensor, op: str) -> None:
    """``x`` is fp32, fp16 or bf16."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: expected a float32/float16/bfloat16 tensor, got {x.dtype}")


def check_dtype(x: torch.Tensor, dtype: torch.dtype, op: str, what: str) -> None:
    """``x`` (named ``what`` in the message) has dtype ``dtype``."""
    if x.dtype != dtype:
        raise TypeError(f"{op}: {what} must be {dtype}, got {x.dtype}")


def check_block(length: int, block: int, op: str) -> None:
    """``length`` is a multiple of the positive ``block``."""
    if block <= 0 or length % block:
        raise ValueError(f"{op}: the last dimension ({length}) must be a positive multiple of block={block}; pad the input")


def check_contiguous(t: torch.Tensor, op: str, what: str) -> None:
    """Launchers and in-place outputs take contiguous tensors; refuse others with the fix in the message."""
    if not t.is_contiguous():
        raise ValueError(f"{op}: {what} must be contiguous (got strides {t.stride()} for shape {tuple(t.shape)}); call .contiguous()")


def check_same_device(op: str, *tensors: torch.Tensor) -> None:
    """All ``tensors`` live on one device."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")


def check_pow2(value: int, op: str, what: str, lo: int = 1, hi: int = 2**20) -> None:
    """Launch parameters become ``tl.arange`` sizes: powers of two within ``[lo, hi]``."""
    if value < lo or value > hi or value & (value - 1):
        raise ValueError(f"{op}: {what}={value} must be a power of two between {lo} and {hi}")


def next_pow2(value: int) -> int:
    """Smallest power of two ``>= value`` (1 for 0)."""
    return 1 << max(value - 1, 0).bit_length()


def as_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` as ``rows`` rows (a view when ``t`` allows it); empty tensors too."""
    if t.dim() == 2 and t.shape[0] == rows:
        return t
    return t.reshape(rows, t.numel() // rows if rows else 0)


def row_major(t: torch.Tensor, op: str, what: str) -> torch.Tensor:
    """``t`` as 2-D rows whose elements are contiguous (any row stride); copies only if they are not."""
    if t.dim() != 2:
        raise ValueError(f"{op}: {what} must be 2-D rows, got shape {tuple(t.shape)}")
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def decode_layout(out_numel: int, rows: int, length: int, op: str) -> tuple[int, tuple[int, ...]]:
    """``(output rows, result shape)`` of a decode of ``rows x length`` values into ``out_numel`` values.

    ``rows * length`` values decode row by row; ``length`` values hold the sum of the rows.
    """
    if out_numel == rows * length:
        return rows, (rows, length)
    if out_numel == length:
        return 1, (length,)
    raise ValueError(f"{op}: out has {out_numel} values, expected {rows * length} (row by row) or {length} (summed)")


def check_accumulate_out(out: torch.Tensor, rows: int, length: int, op: str) -> None:
    """``out`` of a decode-and-add: contiguous fp32 with ``rows * length`` or ``length`` values."""
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"{op}: out must be a contiguous float32 tensor, got {out.dtype} (contiguous={out.is_contiguous()})")
    decode_layout(out.numel(), rows, length, op)


def add_rows(out: torch.Tensor, decoded: torch.Tensor, alpha: float) -> torch.Tensor:
    """``out += alpha * decoded`` row by row, or of the rows' sum when ``out`` holds one row; returns ``out``."""
    flat = out.view(-1)
    if flat.numel() == decoded.numel():
        flat.add_(decoded.reshape(-1), alpha=alpha)
    else:
        flat.add_(decoded.sum(dim=0), alpha=alpha)
    return out
