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

The payload formats live in :mod:`distcomp.codecs`. Every payload carries a
health word (see :func:`~distcomp.numerics.local_health`) so that all ranks
learn, without an extra collective, whether any rank's input held an inf or a NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from distcomp.codecs import BlockCodec, ChunkCodec, TopKCodec, is_fused
from distcomp.comm import Comm
from distcomp.numerics import local_health
from distcomp.workspace import Workspace

HEALTH_BYTES = 4


def exact_mean(buffer: torch.Tensor, comm: Comm) -> torch.Tensor:
    """DDP's own reduction: divide first (keeps fp16 from overflowing), then sum over ranks."""
    buffer.div_(comm.world_size)
    comm.all_reduce(buffer)
    comm.record.nonfinite = bool(local_health(buffer).isnan())
    return buffer


def exact_mean_async(buffer: torch.Tensor, comm: Comm) -> torch.futures.Future:
    """:func:`exact_mean` without waiting for the all-reduce (the same result bit for bit).

    The future holds ``buffer`` once averaged, with ``comm.record.nonfinite``
    set. Its callbacks run on the backend's threads and issue no collective, so
    the order of collectives stays the caller's.
    """
    buffer.div_(comm.world_size)
    record = comm.record  # not comm: a callback must not hold the group (see Comm.all_reduce_async)

    def health(fut: torch.futures.Future) -> torch.Tensor:
        out = fut.value()
        record.nonfinite = bool(local_health(out).isnan())
        return out

    return comm.all_reduce_async(buffer).then(health)


@dataclass
class TwoPhaseResult:
    out: torch.Tensor
    """The mean over ranks, flat, length ``n`` (fp32)."""
    server_error: torch.Tensor
    """The new server-side residual of this rank's chunk."""
    nonfinite: bool
    """Some rank's input held an inf or a NaN."""
    _local: Callable[[], torch.Tensor] = field(repr=False)

    @cached_property
    def local_decoded(self) -> torch.Tensor:
        """This rank's input as the servers decode it (for worker-side error feedback done by the caller), length ``n``.

        Decoded from the phase-1 payload on first access: callers whose error
        feedback was fused into the encode never pay for it.
        """
        return self._local()


def chunk_length(n: int, world_size: int, align: int) -> int:
    """Smallest multiple of ``align`` such that ``world_size`` chunks cover ``n`` values."""
    per = -(-n // world_size)
    return -(-per // align) * align


@dataclass(frozen=True)
class _Piece:
    """Rows ``rows`` and columns ``start .. stop`` of the ``[w, c]`` layout of a flat input.

    They hold the input's values ``src .. src + size``; the rest of the piece is
    zero padding (``size`` is short only in the last, partial block and in rows
    past the end).
    """

    rows: slice
    start: int
    stop: int
    src: int
    size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows.stop - self.rows.start, self.stop - self.start

    @property
    def padded(self) -> bool:
        return self.size < self.shape[0] * self.shape[1]


def _pieces(n: int, w: int, c: int, align: int) -> list[_Piece]:
    """Split the ``[w, c]`` layout of ``n`` values into pieces that are views of the input and padded rest.

    Full rows, then the whole blocks of the partial row, are views; only the
    partial row's last block (fewer than ``align`` values) and rows past the
    end (fewer than ``w * align`` values in all) need a padded copy.
    """
    if n == 0:
        return []
    full = min(n // c, w)
    pieces = [_Piece(slice(0, full), 0, c, 0, full * c)] if full else []
    if full < w:
        m = n - full * c
        head = m // align * align
        row = slice(full, full + 1)
        if head:
            pieces.append(_Piece(row, 0, head, full * c, head))
        if head < c:
            pieces.append(_Piece(row, head, c, full * c + head, m - head))
        if full + 1 < w:
            pieces.append(_Piece(slice(full + 1, w), 0, c, n, 0))
    return pieces


def _piece_of(flat: torch.Tensor, p: _Piece, ws: Workspace, name: str) -> torch.Tensor:
    """Piece ``p`` of ``flat``: a view, or a zero-padded copy in ``ws[name]`` for a padded piece."""
    if not p.padded:
        return flat[p.src : p.src + p.size].view(p.shape)
    buf = ws.zeros(name, p.shape[0] * p.shape[1], flat.dtype, flat.device)
    buf[: p.size].copy_(flat[p.src : p.src + p.size])
    return buf.view(p.shape)


def _encode_pieces(
    codec: BlockCodec,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    residual_out: torch.Tensor | None,
    c: int,
    body: torch.Tensor,
    ws: Workspace,
) -> torch.Tensor:
    """Encode flat ``x`` (plus ``residual``) as ``[w, c]`` rows into ``body`` piece by piece; returns the health."""
    health = torch.zeros(1, dtype=torch.float32, device=x.device)
    for p in _pieces(x.numel(), body.shape[0], c, codec.align):
        grad = _piece_of(x, p, ws, "pad")
        if residual is None or p.size == 0:  # rows past the end have no residual to keep
            health = health + codec.encode_ef(grad, None, None, body[p.rows], c, p.start)
            continue
        target = residual_out if residual_out is not None else residual
        scratch = ws.get("pad_res_out", grad.numel(), torch.float32, x.device).view(p.shape) if p.padded else None
        new = (
            scratch
            if scratch is not None
            else (None if residual_out is None else residual_out[p.src : p.src + p.size].view(p.shape))
        )
        health = health + codec.encode_ef(grad, _piece_of(residual, p, ws, "pad_res"), new, body[p.rows], c, p.start)
        if scratch is not None:  # the copied piece's new residual goes back to its place (the padding's is dropped)
            target[p.src : p.src + p.size].copy_(scratch.view(-1)[: p.size])
    return health


def _decode_pieces(
    codec: BlockCodec, body: torch.Tensor, c: int, n: int, out: torch.Tensor, ws: Workspace
) -> torch.Tensor:
    """The first ``n`` values of the ``[w, c]`` rows in payload ``body``, decoded into flat fp32 ``out``."""
    for p in _pieces(n, body.shape[0], c, codec.align):
        if p.size == 0:
            continue
        if not p.padded:
            codec.decode(body[p.rows], c, out=out[p.src : p.src + p.size], start=p.start, stop=p.stop)
        else:
            tmp = ws.get("pad_out", p.shape[0] * p.shape[1], torch.float32, out.device)
            codec.decode(body[p.rows], c, out=tmp, start=p.start, stop=p.stop)
            out[p.src : p.src + p.size].copy_(tmp[: p.size])
    return out


def _with_health(payload: torch.Tensor, nbytes: int, health: torch.Tensor) -> torch.Tensor:
    """Write ``health`` into the health word after each payload row; returns ``payload``."""
    payload[:, nbytes:].view(torch.float32).copy_(health.reshape(1, 1).expand(payload.shape[0], 1))
    return payload


def _split_health(payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return payload[:, :-HEALTH_BYTES], payload[:, -HEALTH_BYTES:].view(torch.float32)


def _mean_of_rows(codec: ChunkCodec, body: torch.Tensor, c: int, ws: Workspace) -> torch.Tensor:
    """The mean of the ``w`` decoded payload rows of ``body``, into ``ws["chunk"]``."""
    w, dev = body.shape[0], body.device
    chunk = ws.zeros("chunk", c, torch.float32, dev)
    if not is_fused(codec):
        decoded = codec.decode(body, c, out=ws.get("decoded", w * c, torch.float32, dev))
        return torch.sum(decoded.view(w, c), dim=0, out=chunk).div_(w)
    # Summing straight into the chunk needs no decoded copy of the rows. x * (1/w) equals
    # x / w only for a power-of-two w; otherwise divide after, as the sum-then-divide did.
    exact = w & (w - 1) == 0
    codec.decode_add(body, c, chunk, alpha=1.0 / w if exact else 1.0)
    return chunk if exact else chunk.div_(w)


def compressed_reduce_scatter(
    comm: Comm,
    codec: ChunkCodec,
    x: torch.Tensor,
    health: torch.Tensor | None,
    ws: Workspace | None = None,
    *,
    residual: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Phase 1: ``(mean of this rank's chunk [c], this rank's decoded input [n], health [1])``.

    With ``residual`` (flat fp32, ``x``'s size; a :class:`~distcomp.codecs.BlockCodec` only),
    ``x + residual`` is sent and the new worker residual goes to
    ``residual_out`` (default: over ``residual``), all in the encode. ``health``
    of ``None`` is derived from the encoding (a fused codec) or from ``x``.
    """
    chunk, local, health = _reduce_scatter(comm, codec, x, health, ws or Workspace(), residual, residual_out)
    return chunk, local(), health


def _reduce_scatter(
    comm: Comm,
    codec: ChunkCodec,
    x: torch.Tensor,
    health: torch.Tensor | None,
    ws: Workspace,
    residual: torch.Tensor | None,
    residual_out: torch.Tensor | None,
) -> tuple[torch.Tensor, Callable[[], torch.Tensor], torch.Tensor]:
    """:func:`compressed_reduce_scatter` with this rank's decoded input as a function, to decode only on demand."""
    x = x.reshape(-1) if x.is_contiguous() else x.contiguous().view(-1)
    n, w, dev = x.numel(), comm.world_size, x.device
    c = chunk_length(n, w, codec.align)
    nbytes = codec.payload_bytes(c)
    payload = ws.get("send1", w * (nbytes + HEALTH_BYTES), torch.uint8, dev).view(w, nbytes + HEALTH_BYTES)
    body = payload[:, :nbytes]
    if is_fused(codec):
        derived = _encode_pieces(codec, x, residual, residual_out, c, body, ws)

        def local() -> torch.Tensor:
            return _decode_pieces(codec, body, c, n, ws.get("local", n, torch.float32, dev), ws)
    else:
        if residual is not None:
            raise TypeError(f"{type(codec).__name__} does not fuse error feedback into its encode: pass residual=None")
        codec.encode(x.view(w, c) if n == w * c else _padded_rows(x, w, c, ws), body)
        derived = local_health(x)

        def local() -> torch.Tensor:
            return codec.decode(body, c, out=ws.get("local", w * c, torch.float32, dev)).view(-1)[:n]

    _with_health(payload, nbytes, derived if health is None else health)
    received, healths = _split_health(comm.all_to_all(payload))
    return _mean_of_rows(codec, received, c, ws), local, healths.sum().reshape(1)


def _padded_rows(x: torch.Tensor, w: int, c: int, ws: Workspace) -> torch.Tensor:
    """``x`` copied into ``[w, c]`` zero-padded rows (codecs without pieces)."""
    rows = ws.get("rows", w * c, torch.float32, x.device)
    rows[: x.numel()].copy_(x)
    rows[x.numel() :].zero_()
    return rows.view(w, c)


def two_phase_mean(
    comm: Comm,
    codec: ChunkCodec,
    x: torch.Tensor,
    server_error: torch.Tensor | None,
    health: torch.Tensor | None,
    ws: Workspace | None = None,
    *,
    residual: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    server_out: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> TwoPhaseResult:
    """Compressed all-reduce (mean) of flat ``x`` with server-side error feedback.

    ``server_error`` (fp32, one chunk) is added to this rank's chunk before it is
    re-encoded, and the new server residual is written into ``server_out`` if
    given, else over ``server_error`` in place when every rank's input was
    finite (a non-finite step leaves it untouched); it is returned as
    ``result.server_error``. With ``None`` no residual is added and the new one
    lives in ``ws``. ``residual`` / ``residual_out`` fuse the
    worker's error feedback into phase 1 (see :func:`compressed_reduce_scatter`).
    The mean goes to ``out`` (flat fp32, ``x``'s size) if given. Other returned
    tensors may live in ``ws`` and are valid until its next use.
    """
    ws = comm.scratch(ws if ws is not None else Workspace())
    n, w, dev = x.numel(), comm.world_size, x.device
    chunk, local, chunk_health = _reduce_scatter(comm, codec, x, health, ws, residual, residual_out)
    c = chunk.numel()
    if server_error is None:
        server_error = ws.zeros("server", c, torch.float32, dev)
    nbytes = codec.payload_bytes(c)
    payload = ws.get("send2", nbytes + HEALTH_BYTES, torch.uint8, dev).view(1, nbytes + HEALTH_BYTES)
    # Every rank knows after phase 1 whether any input was non-finite: then keep the old residual.
    finite = bool(torch.isfinite(chunk_health).all())
    new_server = server_out if server_out is not None else server_error
    if not finite and new_server is server_error:
        new_server = ws.get("server_spare", c, torch.float32, dev)
    dest = out if out is not None else ws.get("mean", n, torch.float32, dev)
    if is_fused(codec):
        spare = None if new_server is server_error else new_server.view(1, c)
        codec.encode_ef(chunk.view(1, c), server_error.view(1, c), spare, payload[:, :nbytes])
        _with_health(payload, nbytes, chunk_health)
        body, healths = _split_health(comm.all_gather(payload.view(-1), last=True).view(w, -1))
        _decode_pieces(codec, body, c, n, dest, ws)
    else:
        chunk.add_(server_error)
        codec.encode(chunk.view(1, c), payload[:, :nbytes])
        own = codec.decode(payload[:, :nbytes], c, out=ws.get("own", c, torch.float32, dev)).view(-1)
        torch.sub(chunk, own, out=new_server)
        _with_health(payload, nbytes, chunk_health)
        body, healths = _split_health(comm.all_gather(payload.view(-1), last=True).view(w, -1))
        decoded = codec.decode(body, c, out=ws.get("decoded", w * c, torch.float32, dev)).view(-1)
        dest.copy_(decoded[:n])
    nonfinite = not bool(torch.isfinite(healths.sum()))
    server = new_server if finite else server_error
    return TwoPhaseResult(out=dest, server_error=server, nonfinite=nonfinite, _local=local)


def sparse_mean(
    comm: Comm, x: torch.Tensor, k: int, health: torch.Tensor, ws: Workspace | None = None
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Top-``k`` of flat ``x`` on each rank, gathered and averaged: ``(mean, local_decoded, nonfinite)``."""
    ws = ws if ws is not None else Workspace()
    n, codec = x.numel(), TopKCodec(k)
    payload = torch.cat([codec.encode(x), health.view(torch.int32)])
    gathered = comm.all_gather(payload)
    healths = gathered[:, -1:].contiguous().view(torch.float32)
    out = codec.decode_add(gathered[:, :-1], ws.zeros("mean", n, torch.float32, x.device))
    local = codec.decode_add(payload[:-1].view(1, -1), ws.zeros("local", n, torch.float32, x.device))
    return out.div_(comm.world_size), local, not bool(torch.isfinite(healths.sum()))
