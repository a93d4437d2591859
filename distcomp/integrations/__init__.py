"""Compression on the models and optimizers that training frameworks build.

Lightning, Accelerate and the Hugging Face ``Trainer`` wrap the model in DDP or
FSDP themselves, and some wrap the optimizer too. :func:`compress` takes what
they built and registers the right thing: gradient compression
(``distcomp.register`` / ``distcomp.fsdp.register``) or, for the optimizers of
:mod:`distcomp.optim`, their own gradient exchange. The framework modules
(:mod:`~distcomp.integrations.lightning`, :mod:`~distcomp.integrations.hf`,
:mod:`~distcomp.integrations.accelerate`) import their framework; this one imports none.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.nn.parallel import DistributedDataParallel

from distcomp import fsdp, optim
from distcomp.checkpoint import load_state_dict
from distcomp.errors import ConfigError
from distcomp.hooks.ddp import register
from distcomp.optim.base import CompressedOptimizer

logger = logging.getLogger("distcomp")


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside a framework's wrapper (Lightning's ``_optimizer``, Accelerate's ``optimizer``)."""
    for attr in ("_optimizer", "optimizer"):
        inner = getattr(optimizer, attr, None)
        if isinstance(inner, torch.optim.Optimizer):
            return unwrap_optimizer(inner)
    return optimizer


def compressed_optimizers(optimizers: Iterable[Any]) -> list[CompressedOptimizer]:
    """The :mod:`distcomp.optim` optimizers among ``optimizers`` (framework wrappers removed)."""
    return [o for o in map(unwrap_optimizer, optimizers) if isinstance(o, CompressedOptimizer)]


def compress(
    model: nn.Module,
    compressor: str | Any | None,
    optimizers: Iterable[Any] = (),
    *,
    clips: bool = False,
    restore: dict[str, Any] | None = None,
    **options: Any,
) -> Any:
    """Register on ``model`` (DDP, FSDP2 or FSDP1, as the framework wrapped it); returns the state(s) registered.

    With a :mod:`distcomp.optim` optimizer among ``optimizers`` the optimizer
    decides the gradient exchange (``distcomp.optim.register``), and
    ``compressor`` must be None. Such an optimizer is told to accept the single
    checkpoint file rank 0 writes (``reset_errors_from_other_ranks``), as these
    frameworks save one. ``clips`` says the framework clips gradients between
    backward and step: such an optimizer on DDP then exchanges in ``step()``
    (``overlap=False``), as it would anyway after finding the gradients changed,
    without that warning. ``restore`` is the compression state of the checkpoint
    being resumed (:func:`distcomp.state_dict`'s): loaded once registered, or,
    where it cannot resume this job (another world size or compressor),
    skipped with a warning. A model that no framework wrapped (one process) has no
    exchange to compress: None, with a log line.
    """
    mine = compressed_optimizers(optimizers)
    if mine and compressor is not None:
        raise ConfigError(
            f"both a gradient compressor ({compressor!r}) and the compressed optimizer {mine[0].algorithm} were "
            "given: the optimizer compresses its own exchange; drop the compressor"
        )
    if not mine and compressor is None:
        raise ConfigError("no compressor: name one (e.g. 'powersgd') or train with a distcomp.optim optimizer")
    if not isinstance(model, (DistributedDataParallel, FSDPModule, FullyShardedDataParallel)):
        logger.info("distcomp: %s is not distributed (one process): nothing to compress", type(model).__name__)
        return None
    if mine:
        for opt in mine:
            opt.reset_errors_from_other_ranks = True
        if clips and isinstance(model, DistributedDataParallel):
            options.setdefault("overlap", False)
        return [optim.register(model, opt, **options) for opt in mine]
    if isinstance(model, DistributedDataParallel):
        state = register(model, compressor, **options)
    else:
        state = fsdp.register(model, compressor, **options)
    if restore is not None:
        load_state_dict(state, restore, strict=False)
    return state
