"""Checkpoint files that verify themselves: durable writes and ``manifest.json``.

The manifest is the last file written into a checkpoint: the size and sha256 of
every other file (``model.pt``, ``meta.json``, each ``rank<r>.pt``). A checkpoint
whose files do not match it is damaged (a disk error, a copy cut short, a rank
file from another checkpoint) and is never loaded. Checkpoints written before
manifests existed have none: they can be loaded, but not verified.

Choosing what to resume from (:func:`resolve`, :func:`newest`) verifies the
candidates newest first and falls back past damaged ones.

Every file is written in full before it is published: serialized in memory,
written, ``fsync``-ed; a failed write (a full disk) raises :class:`CheckpointError`
naming the file, not torch's internal message.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from distcomp.errors import CheckpointError

logger = logging.getLogger("distcomp.train")
MANIFEST = "manifest.json"
FORMAT = "distcomp.train.manifest/1"
_CHUNK = 1 << 20


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and ``fsync`` it; a clear :class:`CheckpointError` when that fails."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint file {path}: {write_problem(exc)}") from None


def write_state(path: Path, state: Any) -> None:
    """``torch.save`` durably. Serialized in memory first: torch reports a full disk only as "unexpected pos"."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getvalue())


def write_problem(exc: OSError) -> str:
    """``exc`` in words, with the fix for the usual causes."""
    text = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        text += " (the disk is full: free space there, or point checkpoint.dir / log.dir at another disk)"
    return text


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (new files, a rename) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path) -> None:
    """Record the size and sha256 of every file in ``folder`` in its ``manifest.json`` (written last)."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    write_bytes(folder / MANIFEST, (json.dumps({"format": FORMAT, "files": files}, indent=2) + "\n").encode())


def sha256(path: Path) -> str:
    """The hex sha256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class Damage(NamedTuple):
    """What is wrong with a checkpoint: the file, and how."""

    file: str
    what: str

    def __str__(self) -> str:
        return f"{self.file} {self.what}"


def has_manifest(folder: Path) -> bool:
    """True when the checkpoint was written with a manifest (so it can be verified)."""
    return (folder / MANIFEST).exists()


def problem(folder: Path) -> Damage | None:
    """What is wrong with checkpoint ``folder``, or None when it is complete.

    With a manifest every file is checked against it; without one (an older
    checkpoint) only that ``meta.json``, ``model.pt`` and every rank's file exist.
    """
    if not has_manifest(folder):
        return _missing(folder, set(p.name for p in folder.iterdir()))
    try:
        listed = _read(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Damage(MANIFEST, f"is unreadable ({type(exc).__name__}: {exc})")
    for name, entry in listed.items():
        found = _mismatch(folder / name, entry)
        if found:
            return Damage(name, found)
    return _missing(folder, set(listed), where=" from the manifest")


def _read(folder: Path) -> dict[str, dict[str, Any]]:
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
    return {str(name): {"size": int(e["size"]), "sha256": str(e["sha256"])} for name, e in manifest["files"].items()}


def _mismatch(path: Path, entry: dict[str, Any]) -> str | None:
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"has {size} bytes, the manifest says {entry['size']} (cut short or overwritten)"
    if sha256(path) != entry["sha256"]:
        return "does not match its sha256 in the manifest (damaged, or a file of another checkpoint)"
    return None


def _missing(folder: Path, names: set[str], where: str = "") -> Damage | None:
    """The first required file not in ``names``; the rank files required follow meta.json's world size."""
    for name in ("meta.json", "model.pt"):
        if name not in names:
            return Damage(name, f"is missing{where}")
    try:
        world_size = int(json.loads((folder / "meta.json").read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Damage("meta.json", f"is unreadable ({type(exc).__name__}: {exc})")
    for rank in range(world_size):
        if f"rank{rank}.pt" not in names:
            return Damage(f"rank{rank}.pt", f"is missing{where} (meta.json says {world_size} ranks)")
    return None


def candidates(folder: Path) -> list[Path]:
    """The checkpoint directories in ``folder``, newest first (those still being written end in ``.tmp``)."""
    return sorted((p for p in folder.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")), reverse=True)


def newest(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder``; damaged ones are skipped with a warning saying why.

    Verified checkpoints come first; one written before manifests existed is used
    only when no verified one is there, with a warning that it cannot be verified.
    """
    unverified = []
    for path in candidates(folder):
        damage = problem(path)
        if damage is not None:
            logger.warning("checkpoint %s is damaged (%s): skipping it, trying an earlier one", path, damage)
        elif has_manifest(path):
            return path
        else:
            unverified.append(path)
    if unverified:
        _warn_unverified(unverified[0])
        return unverified[0]
    return None


def resolve(path: str | Path) -> Path:
    """A checkpoint directory (verified), or the newest complete one inside a folder of them."""
    path = Path(path)
    if (path / "meta.json").is_file() or has_manifest(path):
        verify(path)
        return path
    found = newest(path)
    if found is None:
        raise CheckpointError(
            f"--resume {path}: no checkpoint there (expected a step_NNNNNN directory with "
            "meta.json, or a folder of them)"
        )
    return found


def verify(path: Path) -> None:
    """Refuse a damaged checkpoint, naming the file; warn when it has no manifest to verify it against."""
    damage = problem(path)
    if damage is not None:
        raise CheckpointError(
            f"--resume {path}: checkpoint file {path / damage.file} is damaged: {damage}; "
            f"resume from an earlier checkpoint (--resume {path.parent} takes the newest "
            "complete one)"
        )
    if not has_manifest(path):
        _warn_unverified(path)


def _warn_unverified(path: Path) -> None:
    logger.warning(
        "checkpoint %s has no %s (written by an older distcomp): its files cannot be verified", path, MANIFEST
    )


def load(path: Path) -> Any:
    """``torch.load`` a checkpoint file (tensors and plain containers only); errors name the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch's messages (zip, unpickling) name no file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"checkpoint file {path} is damaged ({type(exc).__name__}: {first}); resume from an earlier checkpoint"
        ) from None
