"""Checkpoints of the main job: one directory per step, one file per rank.

Layout of ``<dir>/step_000050/``:

* ``meta.json``: format, step, world size, compressor, the settings the
  trajectory depends on, the data fingerprint (read before any rank starts, so a
  mismatch is refused at once);
* ``model.pt``: the model weights (identical on every rank, written by rank 0;
  with FSDP the full weights, gathered from the shards);
* ``rank<r>.pt``: rank r's optimizer state (with FSDP the full state, gathered), compression state (error residuals
  differ per rank), RNG states and the step records so far.

* ``manifest.json``: written last, the size and sha256 of every other file
  (:mod:`distcomp.train.manifest`).

Files are written into ``step_000050.tmp``, ``fsync``-ed, and renamed when every
rank is done, so a directory without the suffix was complete when written; the
manifest tells whether it still is. A damaged checkpoint is never loaded:
``--resume auto`` and ``--resume FOLDER`` fall back to the newest complete one.
Each checkpoint carries its run's id (``meta.json`` ``run_id``, kept by a resume),
and pruning removes only checkpoints of the run that prunes. Loading uses
``torch.load(weights_only=True)``: tensors and plain containers only, no code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distcomp.config import config_to_dict
from distcomp.errors import CheckpointError
from distcomp.train import manifest
from distcomp.train.config import COMPRESSED_OPTIMIZERS, RunSpec, TrainConfig

FORMAT = "distcomp.train/1"
logger = logging.getLogger("distcomp.train")


def trajectory_config(cfg: TrainConfig, spec: RunSpec) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint (plain values).

    Left out on purpose: ``steps`` and ``optimizer.decay_steps`` (a run may be
    continued for longer), logging, evaluation, checkpointing, device and timeouts.
    """
    optimizer = dataclasses.asdict(cfg.optimizer)
    optimizer.pop("decay_steps")
    optimizer["betas"] = list(optimizer["betas"])
    optimizer["name"] = spec.optimizer
    for name in COMPRESSED_OPTIMIZERS:  # only the options of the optimizer this run uses
        options = optimizer.pop(name)
        if name == spec.optimizer:
            optimizer["options"] = options
    out = {
        "seed": cfg.seed,
        "model": dataclasses.asdict(cfg.model),
        "data": dataclasses.asdict(cfg.data),
        "optimizer": json.loads(json.dumps(optimizer)),  # plain values, as they come back from meta.json
        "compression": config_to_dict(spec.compression) if spec.compression is not None else None,
    }
    if cfg.dist.parallel != "ddp":  # DDP checkpoints stay as they were; FSDP's state dicts are keyed otherwise
        out["parallel"] = cfg.dist.parallel
    return out


def step_dir(root: Path, step: int) -> Path:
    """Where the checkpoint after ``step`` steps goes."""
    return root / f"step_{step:06d}"


def save(
    root: Path,
    step: int,
    *,
    rank: int,
    meta: dict[str, Any],
    model: torch.nn.Module,
    rank_state: dict[str, Any],
    keep: int,
    model_state: dict[str, Any] | None = None,
) -> Path:
    """Write this rank's part of the checkpoint after ``step`` steps; collective (every rank calls it).

    ``meta`` holds ``run_id``: pruning keeps the newest ``keep`` checkpoints of that
    run and never touches another run's. ``model_state`` replaces ``model.state_dict()``
    where the model is sharded (FSDP: the full state dict gathered on rank 0). A failed
    write raises :class:`CheckpointError` naming the file.
    """
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        _empty_dir(tmp)
    dist.barrier()
    manifest.write_state(tmp / f"rank{rank}.pt", rank_state)
    if rank == 0:
        manifest.write_state(tmp / "model.pt", model.state_dict() if model_state is None else model_state)
        manifest.write_bytes(
            tmp / "meta.json", (json.dumps({"format": FORMAT, "step": step, **meta}, indent=2) + "\n").encode()
        )
    dist.barrier()  # every rank's file is written and fsync-ed
    if rank == 0:
        _publish(tmp, final, meta["run_id"])
        _prune(root, keep, meta["run_id"])
        logger.info("checkpoint written: %s", final)
    return final


def _empty_dir(path: Path) -> None:
    try:
        shutil.rmtree(path, ignore_errors=True)  # a write cut short by a crash of this run
        path.mkdir(parents=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create checkpoint folder {path}: {manifest.write_problem(exc)}") from None


def _publish(tmp: Path, final: Path, run_id: str) -> None:
    """Seal ``tmp`` with its manifest and rename it to ``final``, durably."""
    try:
        manifest.write_manifest(tmp)
        manifest.fsync_dir(tmp)
        _make_room(final, run_id)
        tmp.rename(final)
        manifest.fsync_dir(final.parent)
    except OSError as exc:
        raise CheckpointError(f"cannot publish checkpoint {final}: {manifest.write_problem(exc)}") from None


def _make_room(final: Path, run_id: str) -> None:
    """A checkpoint of this run at the same step is replaced; another run's is moved aside, never deleted."""
    if not final.exists():
        return
    if run_id_of(final) == run_id:
        shutil.rmtree(final)
        return
    aside = final.parent / "previous" / f"{final.name}.{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    aside.parent.mkdir(exist_ok=True)
    final.rename(aside)
    logger.warning("%s belonged to another run: moved it to %s", final, aside)


def _prune(root: Path, keep: int, run_id: str) -> None:
    if keep <= 0:
        return
    ours = [p for p in manifest.candidates(root) if run_id_of(p) == run_id]
    for old in ours[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def run_id_of(path: Path) -> str | None:
    """The id of the run that wrote checkpoint ``path`` (None: unreadable, or written before runs had ids)."""
    try:
        return json.loads((path / "meta.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def run_root(cfg: TrainConfig, spec: RunSpec) -> Path:
    """The folder a run writes its ``step_*`` checkpoints into."""
    if cfg.checkpoint.dir:
        return Path(cfg.checkpoint.dir) / spec.name
    return Path(cfg.log.dir) / cfg.name / spec.name / "checkpoints"


def read_meta(path: Path) -> dict[str, Any]:
    """The checkpoint's ``meta.json``; a clear error if it is not one of ours."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"--resume {path}: cannot read meta.json ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"--resume {path}: not a distcomp train checkpoint (format {meta.get('format')!r})")
    return meta


def check_compatible(
    meta: dict[str, Any],
    *,
    path: Path,
    world_size: int,
    compressor: str,
    trajectory: dict[str, Any],
    data_fingerprint: str,
) -> None:
    """Refuse a checkpoint from another world size, compressor, config or corpus, naming what differs."""
    if meta["world_size"] != world_size:
        raise CheckpointError(
            f"--resume {path}: the checkpoint was written by {meta['world_size']} ranks but this job has "
            f"{world_size}; error-feedback residuals are per rank and cannot be redistributed. "
            f"Resume with {meta['world_size']} ranks (--set dist.nproc={meta['world_size']})"
        )
    if meta["compressor"] != compressor:
        raise CheckpointError(f"--resume {path}: the checkpoint is of a {meta['compressor']!r} run, not {compressor!r}")
    diffs = _diff(meta["config"], trajectory)
    if diffs:
        raise CheckpointError(
            f"--resume {path}: the checkpoint was written with another config; "
            + "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in diffs)
        )
    if meta["data"] != data_fingerprint:
        raise CheckpointError(
            f"--resume {path}: the checkpoint was trained on other data (data.path or its content changed)"
        )


def _diff(saved: Any, now: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in sorted(saved.keys() | now.keys()):
            out += _diff(saved.get(key), now.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if saved == now else [(prefix, saved, now)]


def load_rank(path: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model state, rank state)`` of ``rank`` from checkpoint ``path``."""
    files = (path / "model.pt", path / f"rank{rank}.pt")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"--resume {path}: {f.name} is missing")
    return manifest.load(files[0]), manifest.load(files[1])


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The RNG states a step may draw from (dropout)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore the states :func:`rng_state` saved."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
