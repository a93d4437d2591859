"""Error feedback: remember what compression dropped and add it back next step.

``corrected = grad + residual``, then ``residual = corrected - decoded`` where
``decoded`` is this rank's own contribution as the receivers will see it. The
invariant ``corrected == decoded + residual`` holds up to float rounding, so no
gradient signal is ever lost, only delayed.

Residuals live as one flat fp32 tensor per bucket layout (fast to add to a
flat bucket), and are saved and loaded per parameter name, so a checkpoint does
not depend on how DDP happened to bucket the parameters.

Compressors whose kernels fuse error feedback into the encode (sign, int8,
int4) never form ``corrected``: the kernel reads the gradient and the residual
and writes the new residual into a spare buffer (:meth:`ErrorFeedback.spare`),
which becomes the residual once the step is known to be finite
(:meth:`ErrorFeedback.commit_spare`), so a non-finite step leaves the old one
untouched without a copy.
"""

from __future__ import annotations

import torch

from distcomp.bucket import Bucket
from distcomp.errors import CheckpointError


class ErrorFeedback:
    """Per-rank residual memory keyed by parameter name.

    Checkpointing: :meth:`state_dict` returns ``{name: residual}`` in fp32 for
    this rank; residuals differ between ranks, so save one file per rank.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._flat: dict[tuple[str, ...], tuple[torch.Tensor, tuple[torch.Size, ...], tuple[int, ...]]] = {}
        self._loose: dict[str, torch.Tensor] = {}
        # The buffers that residuals swapped in by commit_spare are prefixes of, and the spare:
        # one extra buffer per ErrorFeedback, as large as its largest bucket.
        self._owners: dict[tuple[str, ...], torch.Tensor] = {}
        self._spare: torch.Tensor | None = None

    def corrected(self, bucket: Bucket) -> torch.Tensor:
        """The bucket's gradients plus the stored residual, in fp32.

        An fp32 buffer is updated in place and returned (no copy: the buffer is
        the compressor's to overwrite); other dtypes get a new fp32 tensor.
        """
        buf = bucket.buffer
        out = buf if buf.dtype == torch.float32 else buf.to(torch.float32)
        if self.enabled:
            out.add_(self._residual(bucket))
        return out

    def residual(self, bucket: Bucket) -> torch.Tensor:
        """The bucket's flat fp32 residual, for compressors that write it piece by piece.

        Callers must write it only from a finite step (see :meth:`commit`).
        """
        return self._residual(bucket)

    def commit(self, bucket: Bucket, corrected: torch.Tensor, decoded: torch.Tensor) -> float:
        """Store ``corrected - decoded`` as the bucket's residual; return its L2 norm."""
        if not self.enabled:
            return 0.0
        residual = self._residual(bucket)
        torch.sub(corrected, decoded, out=residual)
        return float(torch.linalg.vector_norm(residual))

    def spare(self, bucket: Bucket) -> torch.Tensor:
        """A flat fp32 scratch of the bucket's size for a fused encode to write the new residual into.

        Its content becomes the residual at :meth:`commit_spare`; until then the
        residual is untouched.
        """
        n, device = bucket.numel, bucket.buffer.device
        if self._spare is None or self._spare.numel() < n or self._spare.device != device:
            self._spare = torch.empty(n, dtype=torch.float32, device=device)
        return self._spare[:n]

    def commit_spare(self, bucket: Bucket) -> float:
        """Make what was written into :meth:`spare` the bucket's residual (a finite step only); return its L2 norm.

        The buffers swap roles: the old residual's becomes the spare, so nothing is copied.
        """
        if not self.enabled:
            return 0.0
        residual, shapes, offsets = self._flat[bucket.key]
        if self._spare is None:
            raise RuntimeError("commit_spare without spare(): nothing was written to commit")
        new_owner, old_owner = self._spare, self._owners.get(bucket.key, residual)
        self._owners[bucket.key] = new_owner
        self._flat[bucket.key] = (new_owner[: bucket.numel], shapes, offsets)
        self._spare = old_owner
        return float(torch.linalg.vector_norm(self._flat[bucket.key][0]))

    def _residual(self, bucket: Bucket) -> torch.Tensor:
        entry = self._flat.get(bucket.key)
        if entry is None:
            entry = (self._assemble(bucket), bucket.shapes, bucket.offsets)
            self._flat[bucket.key] = entry
        return entry[0]

    def _assemble(self, bucket: Bucket) -> torch.Tensor:
        """Build a flat residual for a new layout from per-name pieces (a rebuild or a load)."""
        wanted = set(bucket.names)
        for key in [k for k in self._flat if wanted.intersection(k)]:
            self._loose.update(_split(key, *self._flat.pop(key)))
            self._owners.pop(key, None)
        flat = torch.zeros(bucket.numel, dtype=torch.float32, device=bucket.buffer.device)
        for (name, view), shape in zip(bucket.views(flat), bucket.shapes):
            piece = self._loose.pop(name, None)
            if piece is None:
                continue
            if piece.numel() != shape.numel():
                raise CheckpointError(
                    f"error-feedback residual {name!r} has {piece.numel()} elements but the parameter "
                    f"has {shape.numel()} ({tuple(shape)}): the checkpoint is from a different model"
                )
            view.copy_(piece.reshape(shape))
        return flat

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Residuals of this rank by parameter name (fp32 tensors)."""
        out = {name: t.clone() for name, t in self._loose.items()}
        for key, entry in self._flat.items():
            out.update(_split(key, *entry))
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor], shapes: dict[str, torch.Size] | None = None) -> None:
        """Restore residuals; ``shapes`` (name -> shape), when known, is checked now, else at first use."""
        for name, t in state.items():
            if shapes is not None and name in shapes and t.numel() != shapes[name].numel():
                raise CheckpointError(
                    f"error-feedback residual {name!r} has {t.numel()} elements in the checkpoint "
                    f"but the parameter has {shapes[name].numel()} ({tuple(shapes[name])}): "
                    "the checkpoint is from a different model"
                )
        self._flat.clear()
        self._owners.clear()
        self._loose = {name: t.detach().to(torch.float32).clone() for name, t in state.items()}


def _split(
    names: tuple[str, ...], flat: torch.Tensor, shapes: tuple[torch.Size, ...], offsets: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """Cut a flat residual back into per-name tensors (copies)."""
    return {
        name: flat[off : off + shape.numel()].view(shape).clone()
        for name, shape, off in zip(names, shapes, offsets)
    }
