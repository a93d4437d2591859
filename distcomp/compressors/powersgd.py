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

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from distcomp.bucket import Bucket
from distcomp.comm import Comm
from distcomp.compressor import Compressor, CompressorConfig
from distcomp.config import require
from distcomp.error_feedback import ErrorFeedback
from distcomp.errors import CheckpointError
from distcomp.registry import register_compressor
from distcomp.workspace import Workspace


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
        self.generator = torch.Generator().manual_seed(self.config.seed)
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
        w, r = comm.world_size, self.config.rank
        corrected = self.ef.corrected(bucket)
        device = corrected.device
        dense, groups = self._plan(bucket, corrected)
        batched = self.config.batch_same_shape
        batched = device.type == "cuda" if batched is None else batched

        # Stage 1: P = M Q for every matrix, written straight into the all-reduce
        # buffer behind the tensors that are sent exactly.
        n_dense = sum(v.numel() for _, v in dense)
        stage1 = self.ws.get("p", n_dense + sum(len(g) * g[0][1].shape[0] * r for g in groups), torch.float32, device)
        _pack(stage1[:n_dense], [v for _, v in dense])
        ps, pos = [], n_dense
        for g in groups:
            b, (n, m) = len(g), g[0][1].shape
            p = stage1[pos : pos + b * n * r].view(b, n, r)
            pos += p.numel()
            q = torch.stack([self._start_q(name, m, device) for name, _ in g])
            _matmul([mat for _, mat in g], q, p, transpose=False, batched=batched)
            ps.append(p)
        comm.all_reduce(stage1)
        # Any rank's inf or NaN reaches the summed P or the exact part: all ranks see it.
        if not bool(torch.isfinite(stage1).all()):
            comm.record.nonfinite = True
            return bucket.buffer.fill_(float("nan"))

        # Stage 2: orthogonalize P, Q = M^T P, keep this rank's own error, all-reduce Q.
        stage2 = self.ws.get("q", sum(len(g) * g[0][1].shape[1] * r for g in groups), torch.float32, device)
        qs, pos = [], 0
        for g, p in zip(groups, ps):
            orthogonalize_(p, self.config.epsilon)
            b, (n, m) = len(g), g[0][1].shape
            q = stage2[pos : pos + b * m * r].view(b, m, r)
            pos += q.numel()
            _matmul([mat for _, mat in g], p, q, transpose=True, batched=batched)
            qs.append(q)
        if self.config.error_feedback:
            self._store_residual(bucket, dense, groups, ps, qs)
        comm.all_reduce(stage2).div_(w)

        # Decode the means in place of the (no longer needed) corrected gradients.
        _unpack(stage1[:n_dense].div_(w), [v for _, v in dense])
        for g, p, q in zip(groups, ps, qs):
            for i, (name, mat) in enumerate(g):
                torch.mm(p[i], q[i].T, out=mat)
                self.q[name] = q[i].clone()
        if self.config.error_feedback:
            comm.record.residual_norm = float(torch.linalg.vector_norm(self.ef.residual(bucket)))
        if corrected is not bucket.buffer:
            bucket.buffer.copy_(corrected)
        return bucket.buffer

    def _store_residual(
        self,
        bucket: Bucket,
        dense: list[tuple[str, torch.Tensor]],
        groups: list[list[tuple[str, torch.Tensor]]],
        ps: list[torch.Tensor],
        qs: list[torch.Tensor],
    ) -> None:
        """residual = M - P Q^T with this rank's own Q; the exactly-sent tensors leave none."""
        views = dict(bucket.views(self.ef.residual(bucket)))
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
                by_shape[tuple(mat.shape)].append((name, mat))
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
        self.generator.set_state(state["generator"])


def orthogonalize_(p: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Gram-Schmidt on the columns of each matrix of ``p [b, n, r]``, in place."""
    r = p.shape[-1]
    for i in range(r):
        col = p[:, :, i : i + 1]
        col.div_(torch.linalg.vector_norm(col, dim=1, keepdim=True).add_(epsilon))
        if i + 1 < r:
            rest = p[:, :, i + 1 :]
            rest.sub_(col @ (col.transpose(1, 2) @ rest))
    return p


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
