"""Compressed collectives: the schedules that move payloads between ranks.

* linear: the payload is summable (PowerSGD's P and Q, casts, random-k) and goes
  through one ``all_reduce`` per stage; compressors call ``comm.all_reduce``.
* gather (:func:`sparse_mean`): top-k values and indices are all-gathered and
  every rank scatter-adds them.
* two-phase (:func:`two_phase_mean`): payloads that do not add up (sign bits,
  int8/int4 codes) go through an all-to-all; each rank decodes and averages its
  chunk, adds its server-side residual, re-encodes, and the results are
  all-gathered. Phase 1 alone (:func:`compressed_reduce_scatter`) is a
  compressed reduce-scatter.

Every payload carries a health word (see :func:`~distcomp.compressor.local_health`)
so that all ranks learn, without an extra collective, whether any rank's input
held an inf or a NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from distcomp.comm import Comm
from distcomp.kernels import topk_pack, topk_scatter_add
from distcomp.workspace import Workspace

HEALTH_BYTES = 4


class ChunkCodec(Protocol):
    """Encodes fp32 rows into fixed-size byte rows and back."""

    align: int
    """Row lengths must be a multiple of this."""

    def payload_bytes(self, length: int) -> int:
        """Bytes of one encoded row of ``length`` values (a multiple of 4)."""

    def encode(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        """Write the encoding of fp32 ``rows [r, L]`` into uint8 ``out [r, payload_bytes(L)]``."""

    def decode(self, payload: torch.Tensor, length: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 rows ``[r, length]`` from uint8 ``payload [r, payload_bytes(length)]`` (into ``out`` if given)."""


@dataclass
class TwoPhaseResult:
    out: torch.Tensor
    """The mean over ranks, flat, length ``n`` (fp32)."""
    local_decoded: torch.Tensor
    """This rank's input as the servers decode it (for worker-side error feedback), length ``n``."""
    server_error: torch.Tensor
    """The new server-side residual of this rank's chunk."""
    nonfinite: bool
    """Some rank's input held an inf or a NaN."""


def chunk_length(n: int, world_size: int, align: int) -> int:
    """Smallest multiple of ``align`` such that ``world_size`` chunks cover ``n`` values."""
    per = -(-n // world_size)
    return -(-per // align) * align


def _encode_with_health(codec: ChunkCodec, rows: torch.Tensor, health: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``[payload | health]`` byte rows, written into the flat uint8 ``out``."""
    nbytes = codec.payload_bytes(rows.shape[1])
    payload = out.view(rows.shape[0], nbytes + HEALTH_BYTES)
    codec.encode(rows, payload[:, :nbytes])
    payload[:, nbytes:].view(torch.float32).copy_(health.expand(rows.shape[0], 1))
    return payload


def _split_health(payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return payload[:, :-HEALTH_BYTES], payload[:, -HEALTH_BYTES:].view(torch.float32)


def compressed_reduce_scatter(
    comm: Comm, codec: ChunkCodec, x: torch.Tensor, health: torch.Tensor, ws: Workspace | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Phase 1: ``(mean of this rank's chunk [c], this rank's decoded input [n], health [1])``."""
    ws = ws if ws is not None else Workspace()
    n, w, dev = x.numel(), comm.world_size, x.device
    c = chunk_length(n, w, codec.align)
    if n == w * c:
        rows = x.view(w, c)
    else:
        rows = ws.get("rows", w * c, torch.float32, dev)
        rows[:n].copy_(x)
        rows[n:].zero_()
        rows = rows.view(w, c)
    row_bytes = codec.payload_bytes(c) + HEALTH_BYTES
    payload = _encode_with_health(codec, rows, health, ws.get("send", w * row_bytes, torch.uint8, dev))
    local = codec.decode(payload[:, :-HEALTH_BYTES], c, out=ws.get("local", w * c, torch.float32, dev))
    body, healths = _split_health(comm.all_to_all(payload))
    decoded = codec.decode(body, c, out=ws.get("decoded", w * c, torch.float32, dev))
    chunk = torch.sum(decoded.view(w, c), dim=0, out=ws.get("chunk", c, torch.float32, dev)).div_(w)
    return chunk, local.view(-1)[:n], healths.sum().reshape(1)


def two_phase_mean(
    comm: Comm,
    codec: ChunkCodec,
    x: torch.Tensor,
    server_error: torch.Tensor | None,
    health: torch.Tensor,
    ws: Workspace | None = None,
) -> TwoPhaseResult:
    """Compressed all-reduce (mean) of flat fp32 ``x`` with server-side error feedback.

    The returned tensors may live in ``ws`` and are valid until its next use.
    """
    ws = ws if ws is not None else Workspace()
    n, w, dev = x.numel(), comm.world_size, x.device
    chunk, local_decoded, chunk_health = compressed_reduce_scatter(comm, codec, x, health, ws)
    c = chunk.numel()
    if server_error is not None:
        chunk.add_(server_error)
    row_bytes = codec.payload_bytes(c) + HEALTH_BYTES
    payload = _encode_with_health(codec, chunk.view(1, c), chunk_health, ws.get("send", row_bytes, torch.uint8, dev))
    own = codec.decode(payload[:, :-HEALTH_BYTES], c, out=ws.get("own", c, torch.float32, dev)).view(-1)
    body, healths = _split_health(comm.all_gather(payload.view(-1)).view(w, row_bytes))
    out = codec.decode(body, c, out=ws.get("decoded", w * c, torch.float32, dev)).view(-1)[:n]
    return TwoPhaseResult(
        out=out,
        local_decoded=local_decoded,
        server_error=chunk.sub(own),
        nonfinite=not bool(torch.isfinite(healths.sum())),
    )


def sparse_mean(
    comm: Comm, x: torch.Tensor, k: int, health: torch.Tensor, ws: Workspace | None = None
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Top-``k`` of flat ``x`` on each rank, gathered and averaged: ``(mean, local_decoded, nonfinite)``."""
    ws = ws if ws is not None else Workspace()
    n = x.numel()
    payload = torch.cat([topk_pack(x, k), health.view(torch.int32)])
    gathered = comm.all_gather(payload)
    healths = gathered[:, -1:].contiguous().view(torch.float32)
    out = topk_scatter_add(ws.zeros("mean", n, torch.float32, x.device), gathered[:, :-1])
    local = topk_scatter_add(ws.zeros("local", n, torch.float32, x.device), payload[:-1].view(1, -1))
    return out.div_(comm.world_size), local, not bool(torch.isfinite(healths.sum()))
