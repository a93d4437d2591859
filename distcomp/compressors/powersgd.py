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
from distcomp.compressor import Compressor, CompressorConfig, local_health
from distcomp.config import require
from distcomp.error_feedback import ErrorFeedback
from distcomp.errors import CheckpointError
from distcomp.registry import register_compressor


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
        batch_same_shape: bool = True
        """Stack matrices of the same shape and multiply them in one batched matmul."""
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

    def _gains(self, shape: torch.Size) -> bool:
        if len(shape) < 2:
            return False
        n, m = shape[0], shape.numel() // shape[0]
        return n * m >= self.config.min_compression_rate * (n + m) * self.config.rank

    def _start_q(self, name: str, m: int, device: torch.device) -> torch.Tensor:
        q = self.q.get(name) if self.config.warm_start else None
        if q is None or q.shape != (m, self.config.rank):
            q = torch.randn(m, self.config.rank, generator=self.generator).to(device)
        return q

    def compress(self, bucket: Bucket, comm: Comm, step: int) -> torch.Tensor:
        w = comm.world_size
        corrected = self.ef.corrected(bucket)
        health = local_health(corrected)
        dense, groups = self._plan(bucket, corrected)

        # Stage 1: P = M Q for every group, fused with the exact tensors into one all-reduce.
        mats = [torch.stack([v for _, v in g]) for g in groups]
        qs = [torch.stack([self._start_q(n, v.shape[1], v.device) for n, v in g]) for g in groups]
        ps = [torch.bmm(m, q) for m, q in zip(mats, qs)]
        stage1 = comm.all_reduce(torch.cat([*(v.reshape(-1) for _, v in dense), *(p.reshape(-1) for p in ps), health]))
        nonfinite = not bool(torch.isfinite(stage1[-1]))

        # Stage 2: orthogonalize the summed P, Q = M^T P, all-reduce Q.
        offset = sum(v.numel() for _, v in dense)
        for p in ps:
            p.copy_(stage1[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
            orthogonalize_(p, self.config.epsilon)
        new_qs = [torch.bmm(m.transpose(1, 2), p) for m, p in zip(mats, ps)]
        local = [torch.bmm(p, q.transpose(1, 2)) for p, q in zip(ps, new_qs)]
        if new_qs:
            stage2 = comm.all_reduce(torch.cat([q.reshape(-1) for q in new_qs])).div_(w)
            mean_qs, pos = [], 0
            for q in new_qs:
                mean_qs.append(stage2[pos : pos + q.numel()].view_as(q))
                pos += q.numel()
        else:
            mean_qs = []

        # Decode into the bucket, and keep state only from a finite step.
        out = bucket.buffer
        if nonfinite:
            comm.record.nonfinite = True
            return out.fill_(float("nan"))
        out_views = dict(bucket.views(out))
        pos = 0
        for name, v in dense:
            out_views[name].copy_(stage1[pos : pos + v.numel()].view_as(v).div(w).view_as(out_views[name]))
            pos += v.numel()
        decoded = corrected.clone()
        dec_views = dict(bucket.views(decoded))
        for g, p, q, q_mean, loc in zip(groups, ps, new_qs, mean_qs, local):
            approx = torch.bmm(p, q_mean.transpose(1, 2))
            for i, (name, _) in enumerate(g):
                out_views[name].copy_(approx[i].view_as(out_views[name]))
                dec_views[name].copy_(loc[i].view_as(dec_views[name]))
                self.q[name] = q_mean[i].clone()
        comm.record.residual_norm = self.ef.commit(bucket, corrected, decoded)
        return out

    def _plan(
        self, bucket: Bucket, flat: torch.Tensor
    ) -> tuple[list[tuple[str, torch.Tensor]], list[list[tuple[str, torch.Tensor]]]]:
        """Split ``flat``'s views into exact tensors and groups of same-shape matrices (n x m views)."""
        dense: list[tuple[str, torch.Tensor]] = []
        by_shape: dict[tuple[int, int], list[tuple[str, torch.Tensor]]] = defaultdict(list)
        for name, view in bucket.views(flat):
            if self._gains(view.shape):
                mat = view.reshape(view.shape[0], -1)
                key = tuple(mat.shape) if self.config.batch_same_shape else (name,)
                by_shape[key].append((name, mat))
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
