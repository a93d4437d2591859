"""Accelerate: ``distcomp.integrations.accelerate.register(accelerator, model, "powersgd", rank=4)``.

Equivalent to ``distcomp.register(model, ...)`` on the model ``accelerator.prepare``
returned, plus a check that Accelerate was not also asked for a comm hook:
``DistributedDataParallelKwargs(comm_hook=...)`` takes only torch's built-in hooks
and silently ignores anything else (a distcomp name or object included).
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

try:
    from accelerate import Accelerator
    from accelerate.utils import DDPCommunicationHookType
except ImportError as err:
    raise ImportError("distcomp.integrations.accelerate needs Accelerate: pip install accelerate") from err

from distcomp.integrations import compress


def register(
    accelerator: Accelerator,
    model: nn.Module,
    compressor: str | Any | None = None,
    /,
    *,
    optimizers: Any = (),
    **options: Any,
) -> Any:
    """Compress the gradient exchange of ``model`` as ``accelerator.prepare`` returned it (call on every process).

    ``compressor`` and ``options`` are those of ``distcomp.register`` (DDP) or
    ``distcomp.fsdp.register`` (FSDP); a :mod:`distcomp.optim` optimizer in
    ``optimizers`` (prepared or not) is registered instead of a compressor.
    Returns the state(s) registered; None on one process.
    """
    _check_ddp_kwargs(accelerator)
    optimizers = [optimizers] if not isinstance(optimizers, (list, tuple)) else optimizers
    return compress(model, compressor, optimizers, **options)


def _check_ddp_kwargs(accelerator: Accelerator) -> None:
    handler = accelerator.ddp_handler
    hook = getattr(handler, "comm_hook", DDPCommunicationHookType.NO)
    if hook in set(DDPCommunicationHookType) - {DDPCommunicationHookType.NO}:
        raise ValueError(
            f"Accelerate already registered torch's {hook} comm hook (DistributedDataParallelKwargs(comm_hook=...)) "
            "and DDP takes one: drop comm_hook from DistributedDataParallelKwargs to use distcomp's"
        )
    if hook not in set(DDPCommunicationHookType):
        warnings.warn(
            f"DistributedDataParallelKwargs(comm_hook={hook!r}) is ignored by Accelerate, which takes only torch's "
            "built-in hooks; distcomp registers its compression through this call instead: drop comm_hook there",
            stacklevel=3,
        )
