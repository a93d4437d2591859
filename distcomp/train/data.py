"""Bytes in, batches out: the corpus, its train/validation split and each rank's shard.

The default corpus is the text of the ``pydoc_data`` topics, which ships with
every CPython (about 460 KB of English), so the first run needs no download.
Text is cut into non-overlapping windows of ``context + 1`` bytes; each epoch,
:class:`torch.utils.data.DistributedSampler` shuffles them and deals every rank
its own disjoint share. The batch of a step is a pure function of the step, so a
checkpoint's data position is simply its step (plus a fingerprint of the text).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler

from distcomp.errors import ConfigError
from distcomp.train.config import DataConfig


@dataclass(frozen=True)
class Corpus:
    """A text split into train and validation bytes."""

    train: torch.Tensor
    """uint8 bytes of the training text."""
    val: torch.Tensor
    """uint8 bytes of the held-out text (the end of the corpus)."""
    source: str
    """Where the text came from, for logs."""
    fingerprint: str
    """Hash of the text and split; a checkpoint made on other data is refused."""


def load_corpus(cfg: DataConfig, context: int) -> Corpus:
    """Read ``cfg.path`` (or the bundled corpus) and split it; a clear error if it is unusable."""
    text, source = read_text(cfg.path)
    data = text.encode("utf-8")
    split = int(len(data) * (1.0 - cfg.val_fraction))
    train, val = data[:split], data[split:]
    for part, name in ((train, "training"), (val, "validation")):
        if len(part) < context + 1:
            raise ConfigError(
                f"data.path: {source} has {len(data)} bytes, too few for {name} windows of "
                f"model.context + 1 = {context + 1} bytes; use more text or a smaller model.context"
            )
    digest = hashlib.sha256(data).hexdigest()[:16] + f"/{cfg.val_fraction}"
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return Corpus(as_tensor(train), as_tensor(val), source, digest)


def read_text(path: str | None) -> tuple[str, str]:
    """``(text, description)`` of a file, a folder of files, or the bundled ``pydoc_data`` topics."""
    if path is None:
        try:
            from pydoc_data.topics import topics
        except ImportError:
            raise ConfigError(
                "this Python has no pydoc_data module (some distributions strip it); "
                "point data.path at a UTF-8 text file or folder"
            ) from None
        return "\n\n".join(topics[k] for k in sorted(topics)), "pydoc_data topics (bundled with Python)"
    root = Path(path).expanduser()
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p.relative_to(root)))
        if not files:
            raise ConfigError(f"data.path: folder {root} holds no files")
    else:
        raise ConfigError(f"data.path: {root} does not exist (give a UTF-8 text file or a folder of them)")
    return "\n\n".join(_read_utf8(f) for f in files), f"{root} ({len(files)} file{'s' * (len(files) != 1)})"


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _read_utf8(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"data.path: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"data.path: cannot read {path}: {exc.strerror}") from None


def windows(data: torch.Tensor, context: int) -> torch.Tensor:
    """Non-overlapping ``[n, context + 1]`` windows (each shares its last byte with the next one's first)."""
    n = (data.numel() - 1) // context
    return data[: n * context + 1].unfold(0, context + 1, context)


def check_batches(corpus: Corpus, context: int, batch_size: int, world_size: int) -> None:
    """Refuse a batch size the training text cannot fill on ``world_size`` ranks (before any rank starts)."""
    _require_batches(len(windows(corpus.train, context)), context, batch_size, world_size)


def _require_batches(count: int, context: int, batch_size: int, world_size: int) -> None:
    """Refuse a batch that ``count`` training windows cannot fill on every one of ``world_size`` ranks."""
    if count // world_size < batch_size:
        raise ConfigError(
            f"data.batch_size: {count} training windows of {context + 1} bytes are too few for {world_size} "
            f"ranks x data.batch_size {batch_size}; use at most data.batch_size={max(1, count // world_size)}, "
            "more text (data.path) or a smaller model.context"
        )


class ShardedBatches:
    """This rank's training batches: ``batch(step)`` is deterministic, so resuming is exact."""

    def __init__(
        self, data: torch.Tensor, context: int, batch_size: int, rank: int, world_size: int, seed: int
    ) -> None:
        self.windows = windows(data, context)
        self.batch_size = batch_size
        # The sampler reads only len() of its dataset: the window indices serve, though torch types it as a Dataset.
        self.sampler: DistributedSampler[int] = DistributedSampler(
            range(len(self.windows)),  # type: ignore[arg-type]
            num_replicas=world_size,
            rank=rank,
            shuffle=True,
            seed=seed,
            drop_last=True,
        )
        _require_batches(len(self.windows), context, batch_size, world_size)
        self.steps_per_epoch = self.sampler.num_samples // batch_size
        self._epoch = -1
        self._order: list[int] = []

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, batch within the epoch)`` that ``step`` reads."""
        return divmod(step, self.steps_per_epoch)

    def batch(self, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-byte targets, each ``[batch_size, context]`` int64."""
        epoch, index = self.position(step)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._order, self._epoch = list(self.sampler), epoch
        rows = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        seqs = self.windows[rows].to(device=device, dtype=torch.long)
        return seqs[:, :-1], seqs[:, 1:]


def val_batches(
    data: torch.Tensor, context: int, batch_size: int, batches: int, rank: int, world_size: int
) -> list[torch.Tensor]:
    """This rank's share of the fixed validation windows, as up to ``batches`` batches of ``[b, context + 1]``."""
    wins = windows(data, context)[: batches * batch_size * world_size]
    mine = wins[rank::world_size]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
