"""What a run reports: per-step records, TensorBoard scalars, the progress bar and the summary table.

Only rank 0 writes. Bytes and ratios are this rank's (every rank sends the same
amount with the built-in compressors). The summary's "sent per step" and "ratio"
are the steady state, the steps after the compressor's uncompressed warm-up
(``start_step``); the summary JSON also holds the whole-run ratio.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from distcomp.telemetry import Counters

logger = logging.getLogger("distcomp.train")

TIMING_SKIP = 2
"""Steps left out of timing means: DDP builds its buckets in step 0 and rebuilds them in step 1."""


@dataclass(kw_only=True)
class StepRecord(Counters):
    """One optimizer step as rank 0 saw it: this rank's :class:`Counters` and the loss (mean over ranks)."""

    step: int
    loss: float
    lr: float
    step_s: float


@dataclass(kw_only=True)
class RunResult:
    """The summary of one run: a column of the summary table and an entry of summary.json."""

    compressor: str
    steps: int
    params: int
    train_loss: float
    val_loss: float
    steps_per_s: float
    step_ms: float
    sent_bytes: float
    dense_bytes: float
    ratio: float
    ratio_whole_run: float
    codec_ms: float
    comm_ms: float
    wall_s: float
    interrupted: bool = False
    losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON (NaN becomes null)."""
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in dataclasses.asdict(self).items()
        }


def summarize(
    compressor: str,
    records: list[StepRecord],
    *,
    params: int,
    val_losses: list[tuple[int, float]],
    loop_s: float,
    steps_run: int,
    wall_s: float,
    interrupted: bool,
) -> RunResult:
    """Fold a run's step records into its :class:`RunResult`."""
    steady = [r for r in records if r.compressed] or records
    timed = [r for r in records if r.step >= TIMING_SKIP] or records
    tail = records[-10:]
    steady_sum, whole = sum(steady, Counters()), sum(records, Counters())
    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
    per = lambda total: total / len(steady) if steady else math.nan  # noqa: E731 - a steady step's mean
    return RunResult(
        compressor=compressor,
        steps=records[-1].step + 1 if records else 0,
        params=params,
        train_loss=mean([r.loss for r in tail]),
        val_loss=val_losses[-1][1] if val_losses else math.nan,
        steps_per_s=steps_run / loop_s if loop_s > 0 else math.nan,
        step_ms=1e3 * mean([r.step_s for r in timed]),
        sent_bytes=per(steady_sum.sent_bytes),
        dense_bytes=per(steady_sum.dense_bytes),
        ratio=_ratio(steady_sum),
        ratio_whole_run=_ratio(whole),
        codec_ms=1e3 * per(steady_sum.codec_s),
        comm_ms=1e3 * per(steady_sum.comm_s),
        wall_s=wall_s,
        interrupted=interrupted,
        losses=[r.loss for r in records],
        val_losses=list(val_losses),
    )


def _ratio(counts: Counters) -> float:
    """Like :attr:`Counters.ratio`, but NaN (``null`` in summary.json) when nothing was sent (one rank)."""
    return counts.ratio if counts.sent_bytes else math.nan


class TqdmHandler(logging.StreamHandler):
    """Log lines that do not tear a progress bar apart."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class RunMonitor:
    """Rank 0's outputs for one run: TensorBoard scalars, the tqdm bar, periodic log lines."""

    def __init__(
        self,
        *,
        run_dir: Path,
        label: str,
        steps: int,
        start: int,
        progress: bool,
        tensorboard: bool,
        log_every: int,
        fresh: bool,
    ) -> None:
        self.label, self.steps, self.log_every = label, steps, log_every
        self.writer = _writer(run_dir, start, fresh) if tensorboard else None
        self.bar = (
            tqdm(total=steps, initial=start, desc=label, unit="step", dynamic_ncols=True, file=sys.stderr, leave=True)
            if progress
            else None
        )

    def step(self, rec: StepRecord) -> None:
        """Report one finished step."""
        if self.writer is not None:
            self._scalars(self.writer, rec)
        if self.bar is not None:
            post = {"loss": f"{rec.loss:.3f}", "ms/step": f"{1e3 * rec.step_s:.0f}"}
            if math.isfinite(rec.ratio):
                post["ratio"] = f"{rec.ratio:.1f}x"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        elif (rec.step + 1) % self.log_every == 0 or rec.step + 1 == self.steps:
            logger.info(
                "%s step %d/%d: loss %.4f, lr %.2e, %.0f ms/step, sent %s (%s)",
                self.label,
                rec.step + 1,
                self.steps,
                rec.loss,
                rec.lr,
                1e3 * rec.step_s,
                fmt_bytes(rec.sent_bytes),
                fmt_ratio(rec.ratio),
            )

    @staticmethod
    def _scalars(w: _Events, rec: StepRecord) -> None:
        s = rec.step
        w.add_scalar("loss/train", rec.loss, s)
        w.add_scalar("opt/lr", rec.lr, s)
        w.add_scalar("time/step_ms", 1e3 * rec.step_s, s)
        w.add_scalar("time/encode_ms", 1e3 * rec.codec_s, s)
        w.add_scalar("time/comm_ms", 1e3 * rec.comm_s, s)
        w.add_scalar("comm/sent_bytes", rec.sent_bytes, s)
        w.add_scalar("comm/dense_bytes", rec.dense_bytes, s)
        if math.isfinite(rec.ratio):
            w.add_scalar("comm/ratio", rec.ratio, s)
        w.add_scalar("comm/residual_norm", rec.residual_norm, s)

    def val_loss(self, step: int, loss: float) -> None:
        """Report a validation loss measured after ``step`` steps."""
        if self.writer is not None:
            self.writer.add_scalar("loss/val", loss, step)
        logger.info("%s step %d: validation loss %.4f", self.label, step, loss)

    def end_progress(self) -> None:
        """Close the progress bar (later log lines then print below it)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.end_progress()
        if self.writer is not None:
            self.writer.close()


def _writer(run_dir: Path, start: int, fresh: bool) -> Any:
    """A TensorBoard writer for ``run_dir``; a failed write (a full disk) raises an OSError naming the folder.

    Nothing is deleted: a fresh run's folder was cleared before the job started (an
    earlier run's events moved to ``previous/``). On resume, ``purge_step`` hides
    the events this same run wrote after the checkpoint it resumes from.
    """
    from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where it is used

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(run_dir), purge_step=None if fresh else start, flush_secs=10)
    except OSError as exc:
        raise _events_error(run_dir, exc) from None
    return _Events(writer, run_dir)


class _Events:
    """A SummaryWriter whose write errors name the folder (its writer thread raises them on a later call)."""

    def __init__(self, writer: Any, run_dir: Path) -> None:
        self.writer, self.run_dir = writer, run_dir

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """Record one scalar."""
        self._guarded(self.writer.add_scalar, tag, value, step)

    def close(self) -> None:
        """Flush and close the events file."""
        self._guarded(self.writer.close)

    def _guarded(self, call: Any, *args: Any) -> None:
        try:
            call(*args)
        except OSError as exc:
            raise _events_error(self.run_dir, exc) from None


def write_summary(path: Path, data: dict[str, Any]) -> None:
    """Write a summary JSON file whole or not at all; a failed write (a full disk) raises an OSError naming it."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)  # a reader never sees half a file, and a failed write leaves the old one
    except OSError as exc:
        with contextlib.suppress(OSError):  # its folder may be what failed
            tmp.unlink()
        full = exc.errno == errno.ENOSPC
        fix = " (the disk is full: free space there, or set log.dir to another disk)" if full else ""
        raise OSError(exc.errno, f"cannot write the summary {path}: {exc.strerror or exc}{fix}") from None


def _events_error(run_dir: Path, exc: OSError) -> OSError:
    fix = (
        " (the disk is full: free space there, set log.dir to another disk, or log.tensorboard=false)"
        if exc.errno == errno.ENOSPC
        else ""
    )
    return OSError(exc.errno, f"cannot write TensorBoard events to {run_dir}: {exc.strerror or exc}{fix}")


# -- the summary table ---------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    """``12.3 MB`` style, decimal units."""
    if not math.isfinite(n):
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_ratio(r: float) -> str:
    return f"{r:.1f}x" if math.isfinite(r) else "n/a"


def format_table(
    results: list[RunResult],
    header: str,
    predicted: Sequence[tuple[str, Sequence[str]]] = (),
    predicted_note: str = "",
) -> str:
    """The side-by-side summary printed at the end of ``distcomp train``; ``predicted``: extra rows
    ``(label, one cell per run)`` below the measured ones, explained by ``predicted_note``."""
    base = next((r for r in results if r.compressor == "none"), None)

    def val(r: RunResult) -> str:
        text = f"{r.val_loss:.4f}"
        if base is not None and r is not base and math.isfinite(base.val_loss) and base.val_loss:
            text += f" ({100 * (r.val_loss / base.val_loss - 1):+.1f}%)"
        return text

    rows = [
        ("", lambda r: r.compressor + (" (interrupted)" if r.interrupted else "")),
        ("steps", lambda r: str(r.steps)),
        ("final train loss", lambda r: f"{r.train_loss:.4f}"),
        ("final val loss", val),
        ("steps/s", lambda r: f"{r.steps_per_s:.2f}"),
        ("mean step time", lambda r: f"{r.step_ms:.0f} ms"),
        ("sent per step", lambda r: fmt_bytes(r.sent_bytes)),
        ("compression ratio", lambda r: fmt_ratio(r.ratio)),
        ("encode / comm time", lambda r: f"{r.codec_ms:.1f} / {r.comm_ms:.1f} ms"),
        ("wall time", lambda r: f"{r.wall_s:.1f} s" if r.wall_s < 10 else f"{r.wall_s:.0f} s"),
    ]
    cells = [[label, *(fn(r) for r in results)] for label, fn in rows]
    cells += [[label, *values] for label, values in predicted]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = [header, ""]
    for i, row in enumerate(cells):
        lines.append("  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))]).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [
        "",
        "sent per step, ratio and encode/comm time: per rank, after the compressor's warm-up steps;",
        "ratio = bytes of an fp32 ring all-reduce / bytes sent. Train loss: mean of the last 10 steps.",
    ]
    if predicted:
        lines += textwrap.wrap(predicted_note, 100)
    return "\n".join(lines)
