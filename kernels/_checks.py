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
        raise ValueError(
            f"{op}: the last dimension ({length}) must be a positive multiple of block={block}; pad the input"
        )


def check_contiguous(t: torch.Tensor, op: str, what: str) -> None:
    """Launchers and in-place outputs take contiguous tensors; refuse others with the fix in the message."""
    if not t.is_contiguous():
        raise ValueError(
            f"{op}: {what} must be contiguous (got strides {t.stride()} for shape {tuple(t.shape)}); call .contiguous()"
        )


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
        raise ValueError(
            f"{op}: out must be a contiguous float32 tensor, got {out.dtype} (contiguous={out.is_contiguous()})"
        )
    decode_layout(out.numel(), rows, length, op)


def check_encode_out(
    out: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, code_bytes: int, block: int, op: str
) -> None:
    """``out = (codes uint8 [r, code_bytes], scales fp32 [r, L/block])`` for rows ``x [r, L]``: row views with
    contiguous rows (any row stride, e.g. columns of a payload) on ``x``'s device."""
    if not isinstance(out, tuple) or len(out) != 2:
        raise TypeError(f"{op}: out must be a (codes, scales) pair of tensors")
    codes, scales = out
    rows, length = x.shape
    for what, t, dtype, cols in (
        ("codes", codes, torch.uint8, code_bytes),
        ("scales", scales, torch.float32, length // block),
    ):
        if t.dtype != dtype or tuple(t.shape) != (rows, cols):
            raise ValueError(
                f"{op}: out {what} must be {dtype} of shape {(rows, cols)}, got {t.dtype} {tuple(t.shape)}"
            )
        if cols > 1 and t.stride(-1) != 1:
            raise ValueError(f"{op}: out {what} rows must be contiguous (got strides {t.stride()})")
    check_same_device(op, x, codes, scales)


CHUNK_VALUES = 1 << 18
"""Values a reference op handles per piece when it works column piece by column piece (1 MiB of fp32)."""


def column_chunks(
    nblocks: int, block: int, rows: int, values: int | None = None, align: int = 1
) -> list[tuple[int, int]]:
    """Ranges ``[lo, hi)`` of blocks covering ``nblocks`` so that ``rows * (hi - lo) * block`` stays near ``values``.

    References that would otherwise make a temporary as large as their input
    (page-faulted in afresh on every call) walk their columns in such pieces,
    which stay in cache. Pieces start at multiples of ``align`` blocks.
    """
    step = max(1, (CHUNK_VALUES if values is None else values) // max(rows * block, 1))
    step = -(-step // align) * align  # piece boundaries at multiples of `align` blocks (whole bytes of bits)
    return [(lo, min(lo + step, nblocks)) for lo in range(0, nblocks, step)]


def row_column_chunks(rows: int, nblocks: int, block: int, align: int = 1) -> list[tuple[slice, int, int]]:
    """``(row range, first block, end block)`` pieces of ``[rows, nblocks * block]`` near :data:`CHUNK_VALUES` each.

    Long rows are cut into column pieces one row at a time; short rows are
    taken several whole rows at a time.
    """
    per_row = max(nblocks * block, 1)
    if per_row >= CHUNK_VALUES:
        return [
            (slice(r, r + 1), lo, hi) for r in range(rows) for lo, hi in column_chunks(nblocks, block, 1, align=align)
        ]
    step = max(1, CHUNK_VALUES // per_row)
    return [(slice(r, min(r + step, rows)), 0, nblocks) for r in range(0, rows, step)]
