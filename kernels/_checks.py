"""Input validation shared by the public ops."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(x: torch.Tensor, op: str) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: expected a float32/float16/bfloat16 tensor, got {x.dtype}")


def check_dtype(x: torch.Tensor, dtype: torch.dtype, op: str, what: str) -> None:
    if x.dtype != dtype:
        raise TypeError(f"{op}: {what} must be {dtype}, got {x.dtype}")


def check_block(length: int, block: int, op: str) -> None:
    if block <= 0 or length % block:
        raise ValueError(f"{op}: the last dimension ({length}) must be a positive multiple of block={block}; pad the input")
