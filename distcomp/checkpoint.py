"""Compression state in the single-file checkpoints that frameworks write from rank 0.

Error residuals differ per rank, so each compression state saves one file per
rank. Lightning, nanoGPT-style scripts and most training loops save one file,
from rank 0, that every rank loads. One line on every rank keeps the
compression state in that file, one line restores it::

    ckpt = {"model": ..., "optimizer": ..., "compression": distcomp.state_dict(ddp)}  # every rank: it gathers
    if rank == 0:
        torch.save(ckpt, path)
    ...
    distcomp.register(ddp, "powersgd", rank=4)
    distcomp.load_state_dict(ddp, ckpt["compression"])  # every rank takes its own entry

A run that resumes its optimizer but not its compression state is warned at its
first step (:func:`watch_resume`): it would otherwise restart compression from
zero residuals without a word.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from distcomp.errors import CheckpointError

GATHERED_FORMAT = "distcomp.ranks/1"
logger = logging.getLogger("distcomp")

_STATES: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()
"""The compression state registered on each model (DDP, FSDP2 or FSDP1 root)."""
_PENDING: weakref.WeakKeyDictionary[nn.Module, tuple[Any, frozenset[int]]] = weakref.WeakKeyDictionary()
"""Models whose first optimizer step has not yet been checked for a lost compression state: (state, param ids)."""
_step_hook: RemovableHandle | None = None


def attach(model: nn.Module, state: Any) -> None:
    """Record that ``state`` compresses ``model`` (the register functions call this)."""
    global _step_hook
    _STATES[model] = state
    _PENDING[model] = (state, frozenset(id(p) for p in model.parameters()))
    if _step_hook is None:
        _step_hook = register_optimizer_step_pre_hook(_check_first_step)


def compression_state(model: Any) -> Any:
    """The compression state of ``model``, or ``model`` itself when it is one."""
    if hasattr(model, "load_state_dict") and hasattr(model, "compressor"):
        return model
    state = _STATES.get(model)
    if state is None and isinstance(model, DistributedDataParallel):
        state = _STATES.get(model.module)
    if state is None:
        raise ValueError(
            f"no distcomp compression is registered on this {type(model).__name__}: call distcomp.register "
            "(DDP) or distcomp.fsdp.register (FSDP) on it first, on every rank"
        )
    return state


def state_dict(model: Any, *, dst: int = 0) -> dict[str, Any]:
    """Every rank's compression state, gathered on rank ``dst`` for a single-file checkpoint.

    A collective: call it on every rank, where the checkpoint is assembled. Rank
    ``dst`` gets all ranks' states (on the CPU); the others get a dict with only
    their own entry filled, which still resumes that rank. ``model`` is the model
    given to ``distcomp.register`` / ``distcomp.fsdp.register``, or its state.
    """
    own = _to_cpu(compression_state(model).state_dict())
    world, rank = dist.get_world_size(), dist.get_rank()
    ranks: list[Any] = [None] * world
    dist.gather_object(own, ranks if rank == dst else None, dst=dst)
    ranks[rank] = own
    return {"format": GATHERED_FORMAT, "world_size": world, "ranks": ranks}


def load_state_dict(model: Any, state: dict[str, Any], *, strict: bool = True) -> bool:
    """Restore this rank's entry of :func:`state_dict` (or a one-rank state) into ``model``'s compression.

    Call it on every rank after registering. With ``strict=False`` a state that
    cannot resume this job (another world size, compressor or settings) is
    skipped with a warning and compression restarts from scratch; returns whether
    the state was loaded.
    """
    target = compression_state(model)
    try:
        target.load_state_dict(_own_entry(state))
    except CheckpointError as err:
        if strict:
            raise
        warnings.warn(f"distcomp: compression state not restored, it restarts from scratch: {err}", stacklevel=2)
        return False
    return True


def _own_entry(state: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(state, dict) or state.get("format") != GATHERED_FORMAT:
        return state  # one rank's own state: its load_state_dict checks it
    world = dist.get_world_size()
    if state["world_size"] != world:
        raise CheckpointError(
            f"checkpoint was written by a job of {state['world_size']} ranks, this one has {world}: error residuals "
            "are per rank and cannot be redistributed; resume with the same world size"
        )
    own = state["ranks"][dist.get_rank()]
    if own is None:
        raise CheckpointError(
            f"this checkpoint holds no compression state for rank {dist.get_rank()}: it was gathered on another "
            "rank; load the file the gathering rank saved (rank 0 by default)"
        )
    return own


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


# -- the lost-state warning ------------------------------------------------------


def _check_first_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Global optimizer pre-step hook: warn once per model if a resumed run lost its compression state.

    An optimizer that already holds state for a model's parameters at the first
    step after registering was loaded from a checkpoint (torch's optimizers
    create their state in their first step). If the model's compression state
    was not restored too, compression silently restarts from zero residuals.
    """
    global _step_hook
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for model, (state, ids) in list(_PENDING.items()):
        owned = [p for p in params if id(p) in ids]
        if not owned:
            continue
        del _PENDING[model]
        resumed = any(optimizer.state.get(p) for p in owned)
        if resumed and not state.restored and _stateful(state):
            warnings.warn(
                f"distcomp: the optimizer was resumed from a checkpoint but the {state.compressor.name} compression "
                "state was not: compression restarts from zero error residuals (and PowerSGD from a fresh basis). "
                "Save distcomp.state_dict(model) in the checkpoint on every rank and restore it with "
                "distcomp.load_state_dict(model, ...) after registering (docs/integrations.md)",
                stacklevel=3,
            )
    if not _PENDING and _step_hook is not None:
        _step_hook.remove()
        _step_hook = None


def _stateful(state: Any) -> bool:
    """Whether losing ``state`` changes the trajectory: it holds residuals or a basis, or has a warm-up."""
    if state.compressor.config.start_step > 0 or state.compressor.state_dict():
        return True
    return bool(getattr(state, "_residuals", None))
