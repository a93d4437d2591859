"""The compressed exchange: a two-phase mean with error feedback on both sides, and the residuals it keeps.

Payloads that do not add up (sign bits, int8/int4 codes) are averaged by
:func:`~distcomp.collectives.two_phase_mean`. What compression drops is fed
back on both sides: each rank keeps a *worker* residual per bucket (what its own
encoding dropped) and a *server* residual for the chunk of each bucket it
averages (what re-encoding the mean dropped). :class:`TwoPhaseExchange` owns the
server residuals and the schedule; the worker residuals stay where the caller
keeps them (:class:`WorkerResiduals`):

* the DDP compressors keep them in an :class:`~distcomp.error_feedback.ErrorFeedback`
  by parameter name; the encode writes the new ones into a second buffer, and a
  step becomes current only at :meth:`TwoPhaseExchange.end_step` (``staged``), so
  a step that is non-finite anywhere leaves no trace;
* the compressed optimizers keep them in their own state (:class:`ImmediateResiduals`)
  and apply a finite step's residuals at once.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Generic, Protocol, TypeVar

import torch

from distcomp.codecs import ChunkCodec
from distcomp.collectives import TwoPhaseResult, chunk_length, two_phase_mean
from distcomp.comm import Comm
from distcomp.errors import CheckpointError
from distcomp.numerics import l2_norm
from distcomp.workspace import Workspace

K = TypeVar("K")
K_contra = TypeVar("K_contra", contravariant=True)


class WorkerResiduals(Protocol[K_contra]):
    """Where a caller keeps this rank's worker residuals: one flat fp32 tensor per bucket ``key``.

    :class:`~distcomp.error_feedback.ErrorFeedback` (keyed by
    :class:`~distcomp.bucket.Bucket`) is one; :class:`ImmediateResiduals` is another.
    """

    def residual(self, key: K_contra) -> torch.Tensor:
        """The bucket's current residual (flat fp32, the bucket's size); the exchange reads it."""

    def next_residual(self, key: K_contra) -> torch.Tensor | None:
        """Where the encode writes the bucket's new residual, current from :meth:`end_step` on.

        ``None``: the exchange adds the residual to the input itself and, once
        the step is known to be finite, writes the new one over :meth:`residual`.
        """

    def stage(self, key: K_contra) -> float:
        """The bucket's new residual is written (the step was finite): keep it; return its L2 norm."""

    def end_step(self, keep: bool) -> None:
        """Make the staged residuals current (``keep``) or drop them."""


class ImmediateResiduals(Generic[K]):
    """Worker residuals in buffers the caller owns (``buffer(key)``), renewed as soon as a step is known finite.

    Nothing is staged: a non-finite step leaves the buffers untouched, a finite
    one overwrites them.
    """

    def __init__(self, buffer: Callable[[K], torch.Tensor]) -> None:
        self._buffer = buffer

    def residual(self, key: K) -> torch.Tensor:
        """The caller's buffer for ``key``."""
        return self._buffer(key)

    def next_residual(self, key: K) -> None:
        """None: the new residual goes over :meth:`residual`."""
        return None

    def stage(self, key: K) -> float:
        """The L2 norm of the renewed buffer."""
        return l2_norm(self._buffer(key))

    def end_step(self, keep: bool) -> None:
        """Nothing is staged."""


class TwoPhaseExchange(Generic[K]):
    """Two-phase compressed mean of flat buckets, with worker and server error feedback.

    ``owner`` names the state in errors; ``server_key(key)`` is the key a
    bucket's server residual is kept under (stable across steps and
    checkpoints). Without ``worker`` nothing is kept: no error feedback on either
    side. ``staged``: new server residuals go to a second buffer and become
    current at :meth:`end_step` (the worker store stages its own); otherwise the
    server residual is updated in place once the step is known finite.
    ``server``: the dict to keep the server residuals in (a caller's that its
    own checkpoint code reads; the exchange only ever updates it in place).

    Checkpointing: :meth:`state_dict` holds the server residuals by server key
    and the world size they were made for; the worker residuals are the caller's
    to save.
    """

    def __init__(
        self,
        owner: str,
        server_key: Callable[[K], Hashable],
        worker: WorkerResiduals[K] | None = None,
        *,
        staged: bool = True,
        server: dict[Any, torch.Tensor] | None = None,
    ) -> None:
        self.owner = owner
        self.server_key = server_key
        self.worker = worker
        self.staged = staged
        self.server: dict[Any, torch.Tensor] = server if server is not None else {}
        """The current server residuals by server key (fp32, one chunk each)."""
        self.world_size: int | None = None
        """The world the server residuals were made for (set by the first exchange)."""
        # The server residuals this step wrote, made current at end_step, and the buffers they replace.
        self._next: dict[Hashable, torch.Tensor] = {}
        self._spare: dict[Hashable, torch.Tensor] = {}
        self._world_before: int | None = None
        self.ws = Workspace()

    def reduce(
        self,
        comm: Comm,
        codec: ChunkCodec,
        x: torch.Tensor,
        key: K,
        *,
        health: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> TwoPhaseResult:
        """The mean over ranks of flat ``x`` (see :func:`~distcomp.collectives.two_phase_mean`).

        Sets ``comm.record.nonfinite`` (any rank's input held an inf or a NaN:
        nothing is kept) or ``comm.record.residual_norm`` (of the new worker
        residual). ``x`` may be overwritten; the mean goes to ``out`` if given.
        """
        self._check_world(comm.world_size)
        if self.worker is None:
            return _record(comm, two_phase_mean(comm, codec, x, None, health, self.ws, out=out))
        skey = self.server_key(key)
        chunk = chunk_length(x.numel(), comm.world_size, codec.align)
        server = self._server_error(skey, chunk, x.device)
        server_out = self._server_out(skey, chunk, x.device) if self.staged else None
        residual, ef_out = self.worker.residual(key), self.worker.next_residual(key)
        fused = ef_out is not None
        if not fused:
            x.add_(residual)
        ef_in = residual if fused else None
        res = two_phase_mean(
            comm, codec, x, server, health, self.ws, residual=ef_in, residual_out=ef_out, server_out=server_out, out=out
        )
        if _record(comm, res).nonfinite:
            if server_out is not None:
                self._spare[skey] = server_out
            return res
        if not fused:  # the new residual: the corrected input less what the servers decoded of it
            torch.sub(x, res.local_decoded, out=residual)
        (self._next if self.staged else self.server)[skey] = res.server_error
        comm.record.residual_norm = self.worker.stage(key)
        return res

    def begin_step(self) -> None:
        """Remember what a dropped step restores (the world size, if this step sets it)."""
        self._world_before = self.world_size

    def end_step(self, keep: bool) -> None:
        """Make every residual this step staged current (``keep``: the step was finite everywhere), or drop them all.

        Server buffers swap roles, so nothing is copied.
        """
        if self.worker is not None:
            self.worker.end_step(keep)
        if keep:
            for key, new in self._next.items():
                old = self.server.get(key)
                self.server[key] = new
                if old is not None:
                    self._spare[key] = old
        else:
            self.world_size = self._world_before
            self._spare.update(self._next)
        self._next.clear()

    def _check_world(self, world_size: int) -> None:
        if self.world_size is None:
            self.world_size = world_size
        elif self.world_size != world_size:
            raise CheckpointError(
                f"{self.owner} state was made for {self.world_size} ranks but this job has {world_size}: "
                "server residuals are per chunk of the world; start from a fresh state for a new world size"
            )

    def _server_error(self, skey: Hashable, chunk: int, device: torch.device) -> torch.Tensor:
        """The current server residual of ``skey``: zeros on first use, checked against the chunk otherwise."""
        err = self.server.get(skey)
        if err is None:
            err = torch.zeros(chunk, dtype=torch.float32, device=device)
            if not self.staged:  # updated in place from now on
                self.server[skey] = err
            return err
        if err.numel() != chunk:
            raise CheckpointError(
                f"{self.owner}: the server residual of bucket {_describe(skey)} has {err.numel()} values, expected "
                f"{chunk}: the checkpoint is from a different model, bucket size or world size; resume with the "
                "setup that wrote it, or start the residuals afresh"
            )
        return err

    def _server_out(self, skey: Hashable, chunk: int, device: torch.device) -> torch.Tensor:
        """Where this step's new server residual goes: the buffer the current one replaced last time."""
        spare = self._spare.pop(skey, None)
        if spare is None or spare.numel() != chunk or spare.device != device:
            spare = torch.empty(chunk, dtype=torch.float32, device=device)
        return spare

    def state_dict(self) -> dict[str, Any]:
        """``{"server": {server key: residual}, "world_size": int}`` (copies; world size -1 before any exchange)."""
        return {
            "server": {k: v.clone() for k, v in self.server.items()},
            "world_size": self.world_size if self.world_size is not None else -1,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; sizes are checked at each bucket's first exchange."""
        missing = {"server", "world_size"} - set(state)
        if missing:
            raise CheckpointError(f"{self.owner} state is missing {sorted(missing)}: not a {self.owner} checkpoint")
        self.world_size = None if state["world_size"] < 0 else int(state["world_size"])
        self.server.clear()
        self.server.update({k: v.detach().to(torch.float32, copy=True) for k, v in state["server"].items()})
        self._next.clear()
        self._spare.clear()

    def zero_(self) -> None:
        """Zero every server residual in place (the worker residuals are the caller's to reset)."""
        for residual in self.server.values():
            residual.zero_()


def _record(comm: Comm, res: TwoPhaseResult) -> TwoPhaseResult:
    """Tell the bucket's record whether any rank's input was non-finite; returns ``res``."""
    if res.nonfinite:
        comm.record.nonfinite = True
    return res


def _describe(skey: Hashable) -> str:
    """A bucket's server key for a message: an index, or the first and last of its parameter names."""
    if isinstance(skey, tuple) and len(skey) > 2:
        return f"({skey[0]!r} .. {skey[-1]!r}, {len(skey)} parameters)"
    return repr(skey)
