"""``powersgd``: rank-r approximation by one step of power iteration (Vogels et al., 2019).

Per bucket, with ``M = grad + residual`` for every matrix that gains from it::

    P = M Q            all-reduce P (together with the uncompressed tensors)
    P = orthogonalize(P)
    Q = M^T P          residual = M - P Q^T   (this rank's own approximation)
    all-reduce Q       mean = P Q_mean^T

Both payloads are summable, so each stage is one all-reduce, and the mean of the
ranks' approximations is exactly what every rank decodes. Matrices of the same
shape are stacked and multiplied in one batched matmul. Tensors that would not
shrink by ``min_compression_rate`` (biases, norms, small matrices) are sent
exactly, fused into the first all-reduce.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from distcomp.bucket import Bucket
from distcomp.comm import Comm
from distcomp.compressor import Compressor, CompressorConfig
from distcomp.error_feedback import ErrorFeedback
from distcomp.errors import CheckpointError
from distcomp.registry import register_compressor
from distcomp.validation import require
from distcomp.workspace import Workspace

logger = logging.getLogger("distcomp")


@register_compressor("powersgd")
class PowerSGD(Compressor):
    """Low-rank gradient compression with warm-started power iteration and error feedback.

    Checkpointing: :meth:`state_dict` holds this rank's residuals and the shared Q
    matrices by parameter name, and the state of the generator Q is drawn from.
    """

    @dataclass(kw_only=True, frozen=True)
    class Config(CompressorConfig):
        """Options of ``powersgd``."""

        rank: int = 4
        """Rank r of the approximation; each m x n matrix sends (m + n) r values instead of m n."""
        start_step: int = 2
        """First compressed step (DDP rebuilds buckets after step 1; earlier steps are exact)."""
        warm_start: bool = True
        """Reuse last step's Q as the starting point of the power iteration (much better accuracy per byte)."""
        error_feedback: bool = True
        """Add what compression dropped back into the next step's gradient."""
        epsilon: float = 1e-8
        """Added to column norms in Gram-Schmidt orthogonalization, so zero columns stay finite."""
        min_compression_rate: float = 2.0
        """Compress a matrix only if m n / ((m + n) r) reaches this; others are sent exactly."""
        batch_same_shape: bool | None = None
        """Stack matrices of the same shape and multiply them in one batched matmul. ``None``: on CUDA,
        where one launch beats many; on CPU each matrix is multiplied in place, which avoids copying it."""
        seed: int = 0
        """Seed of the generator that draws initial Q (identical on every rank)."""

        def __post_init__(self) -> None:
            super().__post_init__()
            require(self.rank >= 1, "rank", f"must be >= 1, got {self.rank}")
            require(self.epsilon >= 0, "epsilon", f"must be >= 0, got {self.epsilon}")
            require(self.min_compression_rate >= 0, "min_compression_rate", "must be >= 0")

    config: Config

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config)
        self.ef = ErrorFeedback(self.config.error_feedback)
        self.q: dict[str, torch.Tensor] = {}
        # This step's new Q matrices, made current at end_step (see Compressor.end_step).
        self._next_q: dict[str, torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self._generator_before = self.generator.get_state()
        self._checked_rate = False
        self._step_values = self._step_sent = self._step_matrices = self._step_compressed = 0
        self.ws = Workspace()

    def _gains(self, shape: torch.Size) -> bool:
        if len(shape) < 2:
            return False
        n, m = shape[0], shape.numel() // shape[0]
        # A rank above the smaller side would orthogonalize rounding noise into extra columns.
        return min(n, m) >= self.config.rank and n * m >= self.config.min_compression_rate * (n + m) * self.config.rank

    def _start_q(self, name: str, m: int, device: torch.device) -> torch.Tensor:
        q = self.q.get(name) if self.config.warm_start else None
        if q is None:
            return torch.randn(m, self.config.rank, generator=self.generator).to(device)
        if q.shape != (m, self.config.rank):
            raise CheckpointError(
                f"powersgd Q for {name!r} has shape {tuple(q.shape)}, expected {(m, self.config.rank)}: "
                "the checkpoint is from a different model"
            )
        return q.to(device)

    def compress(self, bucket: Bucket, comm: Comm, step: int) -> torch.Tensor:
        corrected = self.ef.corrected(bucket)
        dense, groups = self._plan(bucket, corrected)
        self._count(bucket, dense, groups)
        batched = self.config.batch_same_shape
        batched = corrected.device.type == "cuda" if batched is None else batched
        stage1, ps = self._stage1(comm, bucket, dense, groups, batched)
        # Any rank's inf or NaN reaches the summed P or the exact part: all ranks see it.
        if not bool(torch.isfinite(stage1).all()):
            comm.record.nonfinite = True
            return bucket.buffer.fill_(float("nan"))
        stage2, qs = self._stage2(comm, bucket, dense, groups, ps, batched)
        # Finite inputs give a finite Q unless n max|M| passes fp32's range: never keep that step.
        if not bool(torch.isfinite(stage2).all()):
            comm.record.nonfinite = True
            return bucket.buffer.fill_(float("nan"))
        # Decode the means in place of the (no longer needed) corrected gradients.
        _unpack(stage1[: sum(v.numel() for _, v in dense)], [v for _, v in dense])
        for g, p, q in zip(groups, ps, qs):
            for i, (name, mat) in enumerate(g):
                torch.mm(p[i], q[i].T, out=mat)
                # Q only steers the next power iteration, whose P is normalized: kept at unit
                # scale, so that P = M Q scales like the gradient, not like its square.
                self._next_q[name] = _unit_scale_(q[i].clone().unsqueeze(0)).squeeze(0)
        if self.config.error_feedback:
            comm.record.residual_norm = self.ef.stage(bucket)
        if corrected is not bucket.buffer:
            bucket.buffer.copy_(corrected)
        return bucket.buffer

    def _stage1(
        self,
        comm: Comm,
        bucket: Bucket,
        dense: list[tuple[str, torch.Tensor]],
        groups: list[list[tuple[str, torch.Tensor]]],
        batched: bool,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """All-reduce the mean of the exact tensors and the sum of P = M Q, in one buffer; returns it and the Ps."""
        r, device = self.config.rank, bucket.buffer.device
        n_dense = sum(v.numel() for _, v in dense)
        stage1 = self.ws.get("p", n_dense + sum(len(g) * g[0][1].shape[0] * r for g in groups), torch.float32, device)
        # Divide before summing, as a dense all-reduce does, so that the sum overflows no sooner than it would.
        _pack(stage1[:n_dense], [v for _, v in dense])
        stage1[:n_dense].div_(comm.world_size)
        ps, pos = [], n_dense
        for g in groups:
            b, (n, m) = len(g), g[0][1].shape
            p = stage1[pos : pos + b * n * r].view(b, n, r)
            pos += p.numel()
            q = torch.stack([self._start_q(name, m, device) for name, _ in g])
            _matmul([mat for _, mat in g], q, p, transpose=False, batched=batched)
            ps.append(p)
        comm.all_reduce(stage1)
        return stage1, ps

    def _stage2(
        self,
        comm: Comm,
        bucket: Bucket,
        dense: list[tuple[str, torch.Tensor]],
        groups: list[list[tuple[str, torch.Tensor]]],
        ps: list[torch.Tensor],
        batched: bool,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Orthogonalize P, Q = M^T P, stage this rank's own error, all-reduce the mean of Q; returns it and the Qs."""
        r, device = self.config.rank, bucket.buffer.device
        stage2 = self.ws.get("q", sum(len(g) * g[0][1].shape[1] * r for g in groups), torch.float32, device)
        qs, pos = [], 0
        for g, p in zip(groups, ps):
            orthogonalize_(p, self.config.epsilon)
            b, m = len(g), g[0][1].shape[1]
            q = stage2[pos : pos + b * m * r].view(b, m, r)
            pos += q.numel()
            _matmul([mat for _, mat in g], p, q, transpose=True, batched=batched)
            qs.append(q)
        if self.config.error_feedback:
            self._store_residual(bucket, dense, groups, ps, qs)
        comm.all_reduce(stage2.div_(comm.world_size))
        return stage2, qs

    def begin_step(self) -> None:
        self._generator_before = self.generator.get_state()
        self._step_values = self._step_sent = self._step_matrices = self._step_compressed = 0

    def end_step(self, keep: bool) -> None:
        self.ef.end_step(keep)
        if keep:
            self.q.update(self._next_q)
        else:
            self.generator.set_state(self._generator_before)
        self._next_q.clear()
        if not self._checked_rate:
            self._checked_rate = True
            self._warn_if_nothing_shrinks()

    def _count(
        self, bucket: Bucket, dense: list[tuple[str, torch.Tensor]], groups: list[list[tuple[str, torch.Tensor]]]
    ) -> None:
        """Add the bucket to this step's tally of values a dense all-reduce sends and values sent instead."""
        r = self.config.rank
        self._step_values += bucket.numel
        self._step_sent += sum(v.numel() for _, v in dense) + sum(len(g) * sum(g[0][1].shape) * r for g in groups)
        self._step_matrices += sum(len(g) for g in groups) + sum(1 for _, v in dense if v.dim() >= 2)
        self._step_compressed += sum(len(g) for g in groups)

    def _warn_if_nothing_shrinks(self) -> None:
        """Warn (once, after the first compressed step) when the settings send as much as a dense all-reduce."""
        r, rate = self.config.rank, self.config.min_compression_rate
        if self._step_sent < self._step_values:
            return
        if self._step_compressed == 0:
            logger.warning(
                "powersgd: rank %d compresses none of the %d matrices (each needs rank <= min(n, m) and "
                "n m >= min_compression_rate=%s x (n + m) rank): every gradient is sent dense, as a plain "
                "all-reduce would; lower rank",
                r,
                self._step_matrices,
                rate,
            )
        else:
            logger.warning(
                "powersgd: rank %d sends %.2fx the values of the dense gradient (P and Q take (n + m) rank values "
                "per n x m matrix): lower rank, or raise min_compression_rate=%s to at least 1",
                r,
                self._step_sent / self._step_values,
                rate,
            )

    def _store_residual(
        self,
        bucket: Bucket,
        dense: list[tuple[str, torch.Tensor]],
        groups: list[list[tuple[str, torch.Tensor]]],
        ps: list[torch.Tensor],
        qs: list[torch.Tensor],
    ) -> None:
        """residual = M - P Q^T with this rank's own Q; the exactly-sent tensors leave none."""
        views = dict(bucket.views(self.ef.next_residual(bucket)))
        for name, _ in dense:
            views[name].zero_()
        for g, p, q in zip(groups, ps, qs):
            for i, (name, mat) in enumerate(g):
                torch.addmm(mat, p[i], q[i].T, alpha=-1, out=views[name].view(mat.shape))

    def _plan(
        self, bucket: Bucket, flat: torch.Tensor
    ) -> tuple[list[tuple[str, torch.Tensor]], list[list[tuple[str, torch.Tensor]]]]:
        """Split ``flat``'s views into exact tensors and groups of same-shape matrices (n x m views)."""
        dense: list[tuple[str, torch.Tensor]] = []
        by_shape: dict[tuple[int, int], list[tuple[str, torch.Tensor]]] = defaultdict(list)
        for name, view in bucket.views(flat):
            if self._gains(view.shape):
                mat = view.reshape(view.shape[0], -1)
                by_shape[(mat.shape[0], mat.shape[1])].append((name, mat))
            else:
                dense.append((name, view))
        return dense, list(by_shape.values())

    def state_dict(self) -> dict[str, Any]:
        return {
            "residuals": self.ef.state_dict(),
            "q": {name: q.clone() for name, q in self.q.items()},
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"residuals", "q", "generator"} - set(state)
        if missing:
            raise CheckpointError(f"powersgd state is missing {sorted(missing)}: not a powersgd checkpoint")
        for name, q in state["q"].items():
            if q.dim() != 2 or q.shape[1] != self.config.rank:
                raise CheckpointError(
                    f"powersgd Q for {name!r} has shape {tuple(q.shape)} but rank is {self.config.rank}: "
                    "the checkpoint was written with another rank"
                )
        self.ef.load_state_dict(state["residuals"])
        self.q = {name: q.clone() for name, q in state["q"].items()}
        self._next_q.clear()
        self.generator.set_state(state["generator"])


def orthogonalize_(p: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Gram-Schmidt on the columns of each matrix of ``p [b, n, r]``, in place.

    Each matrix is first scaled by a power of two (exactly) to a largest value in
    [0.5, 1): the result is then the same for ``p`` and ``2^k p`` bit for bit,
    the squared norms cannot overflow or underflow, and ``epsilon`` is relative
    to the matrix's scale.
    """
    _unit_scale_(p)
    r = p.shape[-1]
    for i in range(r):
        col = p[:, :, i : i + 1]
        col.div_(torch.linalg.vector_norm(col, dim=1, keepdim=True).add_(epsilon))
        if i + 1 < r:
            rest = p[:, :, i + 1 :]
            rest.sub_(col @ (col.transpose(1, 2) @ rest))
    return p


def _unit_scale_(x: torch.Tensor) -> torch.Tensor:
    """Scale each matrix of ``x [b, ...]`` in place by the power of two that brings its largest |value| into [0.5, 1).

    Exact (only the exponents change); a zero matrix stays as it is. The exponent
    is clamped so that the factor itself is a finite fp32 number (subnormal peaks are not fully normalized).
    """
    peak = torch.linalg.vector_norm(x, ord=float("inf"), dim=tuple(range(1, x.dim())), keepdim=True)
    exponent = torch.frexp(peak).exponent.clamp_(min=-125)
    return x.mul_(torch.ldexp(torch.ones_like(peak), exponent.neg_()))


def _matmul(mats: list[torch.Tensor], rhs: torch.Tensor, out: torch.Tensor, *, transpose: bool, batched: bool) -> None:
    """``out[i] = mats[i] @ rhs[i]`` (or ``mats[i].T @ rhs[i]``), batched or one matrix at a time."""
    if batched:
        stacked = torch.stack(mats)
        torch.bmm(stacked.transpose(1, 2) if transpose else stacked, rhs, out=out)
        return
    for i, mat in enumerate(mats):
        torch.mm(mat.T if transpose else mat, rhs[i], out=out[i])


def _pack(dst: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    pos = 0
    for t in tensors:
        dst[pos : pos + t.numel()].copy_(t.reshape(-1))
        pos += t.numel()


def _unpack(src: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    pos = 0
    for t in tensors:
        t.copy_(src[pos : pos + t.numel()].view_as(t))
        pos += t.numel()
