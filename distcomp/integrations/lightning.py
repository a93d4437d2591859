"""PyTorch Lightning: ``Trainer(callbacks=[Compression("powersgd", rank=4)])``.

Lightning registers a ``DDPStrategy(ddp_comm_hook=...)`` only on CUDA, and a
distcomp state cannot be built before the process group exists; the callback
registers on the model Lightning wrapped, at ``on_fit_start`` (after the
wrapping, before the first step), on CPU and GPU alike.

Checkpoints: Lightning writes one file, from rank 0. The callback's state holds
every rank's compression state, gathered to rank 0 when the checkpoint is made
(:func:`distcomp.state_dict`), and each rank takes its own back when a run
resumes with ``ckpt_path=``, so a resumed run continues exactly. The
:mod:`distcomp.optim` optimizers returned by ``configure_optimizers`` are
registered instead of a compressor; they keep the moments and step of rank 0's
file and restart the other ranks' error residuals, with one warning.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import Callback
except ImportError as err:
    raise ImportError(
        "distcomp.integrations.lightning needs Lightning 2 (the lightning package): pip install lightning"
    ) from err

from distcomp.checkpoint import state_dict
from distcomp.integrations import compress


class Compression(Callback):
    """Compress what Lightning's DDP or FSDP model sends: ``Compression("powersgd", rank=4)``.

    ``compressor`` and ``options`` are those of ``distcomp.register`` (DDP) or
    ``distcomp.fsdp.register`` (FSDP). With no compressor, the
    :mod:`distcomp.optim` optimizers of ``configure_optimizers`` are registered
    instead. :attr:`state` is what was registered (None before fitting, or on one process).
    """

    def __init__(self, compressor: str | Any | None = None, **options: Any) -> None:
        self.compressor = compressor
        self.options = options
        self.state: Any = None
        self._restore: dict[str, Any] | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        model = trainer.strategy.model
        if model is None:  # Lightning sets it before on_fit_start; None would be a Lightning bug
            raise RuntimeError("distcomp: Lightning's strategy holds no model at on_fit_start")
        clips = bool(trainer.gradient_clip_val)
        self.state = compress(
            model, self.compressor, trainer.optimizers, clips=clips, restore=self._restore, **self.options
        )
        self._restore = None

    def state_dict(self) -> dict[str, Any]:
        # Lightning builds the checkpoint on every rank and rank 0 writes it: gathering here is collective-safe.
        if self.compressor is None or self.state is None:
            return {}
        return {"compression": state_dict(self.state)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before it wraps the model: applied at on_fit_start, once registered.
        self._restore = state_dict.get("compression")
