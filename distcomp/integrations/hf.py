"""The Hugging Face ``Trainer``: ``Trainer(..., callbacks=[Compression("powersgd", rank=4)])``.

The ``Trainer`` wraps the model in DDP inside ``train()`` and hands its callbacks
only the unwrapped model, so the callback registers at the first call of the
DDP wrapper around that model (a forward pre-hook on every module, removed at
that call), before its first forward. An FSDP model is handed over wrapped and
is registered at ``on_train_begin``.

Checkpoints: each rank saves its compression state as
``distcomp_rank{N}.pt`` in the checkpoint folder, beside the ``Trainer``'s own
``rng_state_{N}.pth``, and a run resumed from that folder loads it back: from
``resume_from_checkpoint=True``, or a folder named in ``TrainingArguments``, or
``checkpoint-{step}`` in ``output_dir`` (the ``Trainer`` hands its callbacks no
other path; a resumed run that finds no state is warned at its first step).
:mod:`distcomp.optim` optimizers passed as ``optimizers=(opt, None)`` are
registered instead of a compressor; the ``Trainer`` saves their state from rank
0 only, so they restart the other ranks' error residuals, with one warning.
"""

from __future__ import annotations

import os
from typing import Any, cast

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.nn.parallel import DistributedDataParallel
from torch.utils.hooks import RemovableHandle

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as err:
    raise ImportError("distcomp.integrations.hf needs transformers: pip install transformers accelerate") from err

from distcomp.integrations import compress, compressed_optimizers

STATE_FILE = "distcomp_rank{rank}.pt"


class Compression(TrainerCallback):
    """Compress what the ``Trainer``'s DDP or FSDP model sends: ``Compression("powersgd", rank=4)``.

    ``compressor`` and ``options`` are those of ``distcomp.register`` (DDP) or
    ``distcomp.fsdp.register`` (FSDP); with no compressor, a
    :mod:`distcomp.optim` optimizer given to the ``Trainer`` is registered.
    :attr:`state` is what was registered (None before training, or on one process).
    """

    def __init__(self, compressor: str | Any | None = None, **options: Any) -> None:
        self.compressor = compressor
        self.options = options
        self.state: Any = None
        self._hook: RemovableHandle | None = None
        self._restore: dict[str, Any] | None = None
        self._clips = False

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        # The Trainer loads a resumed optimizer state (rank 0's single file) before on_train_begin.
        for opt in compressed_optimizers([kwargs.get("optimizer")]):
            opt.reset_errors_from_other_ranks = True

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model, optimizer = kwargs["model"], kwargs.get("optimizer")
        self._restore = self._saved_state(args, state)
        self._clips = bool(args.max_grad_norm)
        optimizers = [] if optimizer is None else [optimizer]
        if isinstance(model, (DistributedDataParallel, FSDPModule, FullyShardedDataParallel)):
            self._register(cast(nn.Module, model), optimizers)
        elif torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            self._await_wrapper(model, optimizers)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.compressor is None or self.state is None:
            return
        torch.save(self.state.state_dict(), os.path.join(_checkpoint_folder(args, state), _state_file(args)))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._remove_hook()

    def _await_wrapper(self, model: nn.Module, optimizers: list[Any]) -> None:
        """Register at the first call of the DDP wrapper around ``model`` (the Trainer made it, out of reach)."""

        def pre_hook(module: nn.Module, args: Any) -> None:
            if isinstance(module, DistributedDataParallel) and module.module is model:
                self._remove_hook()
                self._register(module, optimizers)

        self._remove_hook()
        self._hook = nn.modules.module.register_module_forward_pre_hook(pre_hook)

    def _register(self, model: nn.Module, optimizers: list[Any]) -> None:
        self.state = compress(
            model, self.compressor, optimizers, clips=self._clips, restore=self._restore, **self.options
        )
        self._restore = None

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _saved_state(self, args: TrainingArguments, state: TrainerState) -> dict[str, Any] | None:
        """This rank's compression state in the checkpoint being resumed, if the run resumes from one."""
        if self.compressor is None or state.global_step == 0:
            return None
        folders = [_checkpoint_folder(args, state)]
        if isinstance(args.resume_from_checkpoint, str):
            folders.insert(0, args.resume_from_checkpoint)
        for folder in folders:
            path = os.path.join(folder, _state_file(args))
            if os.path.exists(path):
                return torch.load(path, weights_only=True)
        return None  # the resumed-without-state warning of distcomp.checkpoint speaks at the first step


def _checkpoint_folder(args: TrainingArguments, state: TrainerState) -> str:
    """The folder the Trainer saves the checkpoint of ``state.global_step`` in."""
    return os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}")


def _state_file(args: TrainingArguments) -> str:
    """This rank's compression-state file in a checkpoint folder."""
    return STATE_FILE.format(rank=args.process_index)
