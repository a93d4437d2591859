"""Error feedback: remember what compression dropped and add it back next step.

``corrected = grad + residual``, then ``residual = corrected - decoded`` where
``decoded`` is this rank's own contribution as the receivers will see it. The
invariant ``corrected == decoded + residual`` holds up to float rounding, so no
gradient signal is ever lost, only delayed.

Residuals live as one flat fp32 tensor per bucket layout (fast to add to a
flat bucket), and are saved and loaded per parameter name, so a checkpoint does
not depend on how DDP happened to bucket the parameters.

New residuals are staged, never written over the current ones: each layout
has a second buffer (:meth:`ErrorFeedback.next_residual`) that the step writes
into (a fused encode, for sign, int8 and int4, writes there directly), and
:meth:`ErrorFeedback.end_step` swaps the two buffers of every staged layout at
once, or drops them all. A step that is non-finite in any bucket on any rank
therefore leaves every residual untouched, without a copy; the price is a
second buffer as large as the residuals.
"""

from __future__ import annotations

import torch

from distcomp.bucket import Bucket
from distcomp.errors import CheckpointError
from distcomp.numerics import l2_norm


class ErrorFeedback:
    """Per-rank residual memory keyed by parameter name.

    It is the worker-residual store (:class:`~distcomp.exchange.WorkerResiduals`,
    keyed by :class:`~distcomp.bucket.Bucket`) of the staged two-phase exchange.

    Checkpointing: :meth:`state_dict` returns ``{name: residual}`` in fp32 for
    this rank; residuals differ between ranks, so save one file per rank.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._flat: dict[tuple[str, ...], tuple[torch.Tensor, tuple[torch.Size, ...], tuple[int, ...]]] = {}
        self._loose: dict[str, torch.Tensor] = {}
        # Per layout, the buffer the step's new residual is written into, and the layouts written this step.
        self._back: dict[tuple[str, ...], torch.Tensor] = {}
        self._staged: set[tuple[str, ...]] = set()

    def corrected(self, bucket: Bucket) -> torch.Tensor:
        """The bucket's gradients plus the current residual, in fp32.

        An fp32 buffer is updated in place and returned (no copy: the buffer is
        the compressor's to overwrite); other dtypes get a new fp32 tensor.
        """
        buf = bucket.buffer
        out = buf if buf.dtype == torch.float32 else buf.to(torch.float32)
        if self.enabled:
            out.add_(self._residual(bucket))
        return out

    def residual(self, bucket: Bucket) -> torch.Tensor:
        """The bucket's current flat fp32 residual (read it; new values go to :meth:`next_residual`)."""
        return self._residual(bucket)

    def next_residual(self, bucket: Bucket) -> torch.Tensor:
        """The flat fp32 buffer that this step's new residual of the bucket is written into.

        It becomes the residual at :meth:`end_step` if the bucket was staged
        (:meth:`stage`) and the step is kept; until then the residual is untouched.
        """
        self._residual(bucket)
        back = self._back.get(bucket.key)
        if back is None or back.device != bucket.buffer.device:
            back = self._back[bucket.key] = torch.empty(bucket.numel, dtype=torch.float32, device=bucket.buffer.device)
        return back

    def stage(
        self, bucket: Bucket, corrected: torch.Tensor | None = None, decoded: torch.Tensor | None = None
    ) -> float:
        """Stage the bucket's new residual for :meth:`end_step`; return its L2 norm.

        With ``corrected`` and ``decoded`` the new residual is their difference;
        without, it is what the caller wrote into :meth:`next_residual`.
        """
        if not self.enabled:
            return 0.0
        new = self.next_residual(bucket)
        if corrected is not None and decoded is not None:
            torch.sub(corrected, decoded, out=new)
        self._staged.add(bucket.key)
        return l2_norm(new)

    def end_step(self, keep: bool) -> None:
        """Make every staged residual current (``keep``: the step was finite everywhere), or drop them all.

        The buffers swap roles, so nothing is copied.
        """
        if keep:
            for key in self._staged:
                residual, shapes, offsets = self._flat[key]
                self._flat[key] = (self._back[key], shapes, offsets)
                self._back[key] = residual
        self._staged.clear()

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
            self._back.pop(key, None)
            self._staged.discard(key)
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
        self._back.clear()
        self._staged.clear()
        self._loose = {name: t.detach().to(torch.float32).clone() for name, t in state.items()}


def _split(
    names: tuple[str, ...], flat: torch.Tensor, shapes: tuple[torch.Size, ...], offsets: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """Cut a flat residual back into per-name tensors (copies)."""
    return {
        name: flat[off : off + shape.numel()].view(shape).clone() for name, shape, off in zip(names, shapes, offsets)
    }
