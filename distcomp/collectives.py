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
import torch.nn.functional as F

from distcomp.comm import Comm
from distcomp.kernels import topk_pack, topk_scatter_add

HEALTH_BYTES = 4


class ChunkCodec(Protocol):
    """Encodes fp32 rows into fixed-size byte rows and back."""

    align: int
    """Row lengths must be a multiple of this."""

    def payload_bytes(self, length: int) -> int:
        """Bytes of one encoded row of ``length`` values (a multiple of 4)."""

    def encode(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        """Write the encoding of fp32 ``rows [r, L]`` into uint8 ``out [r, payload_bytes(L)]``."""

    def decode(self, payload: torch.Tensor, length: int) -> torch.Tensor:
        """fp32 rows ``[r, length]`` from uint8 ``payload [r, payload_bytes(length)]``."""


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


def _with_health(codec: ChunkCodec, rows: torch.Tensor, health: torch.Tensor) -> torch.Tensor:
    nbytes = codec.payload_bytes(rows.shape[1])
    payload = torch.empty(rows.shape[0], nbytes + HEALTH_BYTES, dtype=torch.uint8, device=rows.device)
    codec.encode(rows, payload[:, :nbytes])
    payload[:, nbytes:].view(torch.float32).copy_(health.expand(rows.shape[0], 1))
    return payload


def _split_health(payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return payload[:, :-HEALTH_BYTES], payload[:, -HEALTH_BYTES:].view(torch.float32)


def compressed_reduce_scatter(
    comm: Comm, codec: ChunkCodec, x: torch.Tensor, health: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Phase 1: ``(mean of this rank's chunk [c], this rank's decoded input [n], health [1])``."""
    n, w = x.numel(), comm.world_size
    c = chunk_length(n, w, codec.align)
    rows = F.pad(x, (0, w * c - n)).view(w, c)
    payload = _with_health(codec, rows, health)
    local_decoded = codec.decode(payload[:, :-HEALTH_BYTES], c).view(-1)[:n]
    received = comm.all_to_all(payload)
    body, healths = _split_health(received)
    chunk_mean = codec.decode(body, c).sum(dim=0).div_(w)
    return chunk_mean, local_decoded, healths.sum().reshape(1)


def two_phase_mean(
    comm: Comm, codec: ChunkCodec, x: torch.Tensor, server_error: torch.Tensor | None, health: torch.Tensor
) -> TwoPhaseResult:
    """Compressed all-reduce (mean) of flat fp32 ``x`` with server-side error feedback."""
    n = x.numel()
    chunk, local_decoded, chunk_health = compressed_reduce_scatter(comm, codec, x, health)
    if server_error is not None:
        chunk.add_(server_error)
    payload = _with_health(codec, chunk.view(1, -1), chunk_health)
    own = codec.decode(payload[:, :-HEALTH_BYTES], chunk.numel()).view(-1)
    gathered = comm.all_gather(payload.view(-1)).view(comm.world_size, -1)
    body, healths = _split_health(gathered)
    out = codec.decode(body, chunk.numel()).view(-1)[:n]
    return TwoPhaseResult(
        out=out,
        local_decoded=local_decoded,
        server_error=chunk.sub_(own),
        nonfinite=not bool(torch.isfinite(healths.sum())),
    )


def sparse_mean(comm: Comm, x: torch.Tensor, k: int, health: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Top-``k`` of flat ``x`` on each rank, gathered and averaged: ``(mean, local_decoded, nonfinite)``."""
    payload = torch.cat([topk_pack(x, k), health.view(torch.int32)])
    gathered = comm.all_gather(payload)
    healths = gathered[:, -1:].contiguous().view(torch.float32)
    out = topk_scatter_add(torch.zeros_like(x, dtype=torch.float32), gathered[:, :-1])
    local = topk_scatter_add(torch.zeros_like(x, dtype=torch.float32), payload[:-1].view(1, -1))
    return out.div_(comm.world_size), local, not bool(torch.isfinite(healths.sum()))
