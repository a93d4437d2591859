"""How the ranks of ``distcomp train`` start, fail and stop.

* Under a launcher (``torchrun``, or anything that sets RANK and WORLD_SIZE)
  this process is one rank: it joins the job through ``env://``.
* Otherwise it spawns ``dist.nproc`` local ranks that meet through a file store,
  and supervises them: when one fails, the others are killed at once and the
  job exits non-zero with that rank's error.
* Every check that can fail (config, device, data, checkpoint) runs before any
  rank starts. Every collective has ``dist.timeout_s``; on success each rank
  passes a barrier and destroys its process group before exiting (exiting right
  after DDP can otherwise abort with "terminate called without an active exception").
* Ctrl-C: the ranks finish the current step, agree to stop, write a checkpoint
  (when checkpoints are on) and the summary so far, and exit with 130. A second
  Ctrl-C kills them.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from distcomp.errors import ConfigError
from distcomp.train import checkpoint
from distcomp.train.config import DistConfig, TrainConfig
from distcomp.train.data import check_batches, load_corpus
from distcomp.train.job import EXIT_INTERRUPTED, rank_job
from distcomp.train.loop import RankContext
from distcomp.train.optim import first_compressed_step
from distcomp.train.telemetry import TqdmHandler

logger = logging.getLogger("distcomp.train")
RESUME_AUTO = "auto"
"""``--resume auto``: the newest checkpoint of this config's run if there is one, else a fresh start."""
_STOP = threading.Event()


@dataclass(frozen=True)
class Placement:
    """Where one rank runs."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def under_launcher() -> bool:
    """True when a launcher (torchrun, mpirun wrappers, SLURM scripts) already made this process a rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(cfg: TrainConfig, resume: str | Path | None) -> int:
    """Run ``distcomp train``: join the launcher's job or spawn local ranks; the process exit code."""
    if under_launcher():
        place = Placement(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                          int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
                          int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))
        path = preflight(cfg, resume, place.world_size, place.local_world_size)
        return _join(cfg, path, place)
    path = preflight(cfg, resume, cfg.dist.nproc, cfg.dist.nproc)
    return _spawn(cfg, path)


def preflight(cfg: TrainConfig, resume: str | Path | None, world_size: int, local_world_size: int) -> Path | None:
    """Every check that needs no process group; raises :class:`ConfigError`/:class:`CheckpointError`."""
    device, _ = select_device(cfg.dist, 0)
    if device.type == "cuda" and local_world_size > torch.cuda.device_count():
        raise ConfigError(f"dist.nproc: {local_world_size} ranks on this machine but only "
                          f"{torch.cuda.device_count()} CUDA devices (one GPU per rank); or use --device cpu")
    if device.type == "cpu":
        check_cpu_ranks(local_world_size)
    corpus = load_corpus(cfg.data, cfg.model.context)
    check_batches(corpus, cfg.model.context, cfg.data.batch_size, world_size)
    runs = cfg.runs()
    for spec in runs:
        first = first_compressed_step(cfg.optimizer, spec.optimizer)
        if first >= cfg.steps:
            logger.warning("%s compresses from step %d (optimizer.%s.freeze_step) but the run has %d steps: "
                           "it will only run its exact warm-up", spec.optimizer, first, spec.optimizer, cfg.steps)
    if resume == RESUME_AUTO:
        resume = _newest_checkpoint(cfg)
    if resume is None:
        return None
    path = checkpoint.resolve(resume)
    meta = checkpoint.read_meta(path)
    if len(runs) != 1:
        raise ConfigError(
            f"--resume continues one run, but compare lists {[r.name for r in runs]}; "
            f"add --set compare=[{meta['compressor']}] to resume the {meta['compressor']!r} run"
        )
    spec = runs[0]
    if meta["step"] > cfg.steps:
        raise ConfigError(f"--resume {path}: the checkpoint is at step {meta['step']}, beyond steps={cfg.steps}; "
                          f"raise steps (--set steps=...)")
    checkpoint.check_compatible(meta, path=path, world_size=world_size, compressor=spec.name,
                                trajectory=checkpoint.trajectory_config(cfg, spec),
                                data_fingerprint=corpus.fingerprint)
    if meta.get("schedule_steps") != (cfg.optimizer.decay_steps or cfg.steps):
        logger.warning("the learning-rate schedule was %s steps long and is now %s: the curve will not match an "
                       "uninterrupted run (set optimizer.decay_steps to keep it)", meta.get("schedule_steps"),
                       cfg.optimizer.decay_steps or cfg.steps)
    return path


def _newest_checkpoint(cfg: TrainConfig) -> Path | None:
    """What ``--resume auto`` continues from: the newest checkpoint of the config's runs, or None (a fresh start)."""
    found = [p for spec in cfg.runs() if (p := checkpoint.newest(checkpoint.run_root(cfg, spec))) is not None]
    if not found:
        logger.info("--resume auto: no checkpoint yet under %s; starting from step 0",
                    ", ".join(str(checkpoint.run_root(cfg, spec)) for spec in cfg.runs()))
        return None
    return max(found, key=lambda p: p.name)


MAX_RANKS_PER_CORE = 16
"""More CPU ranks than this per core only thrash: each is a process with its own copy of the model."""


def check_cpu_ranks(local_world_size: int) -> None:
    """Refuse a number of CPU ranks on this machine that could only exhaust it."""
    cores = os.cpu_count() or 1
    if local_world_size > MAX_RANKS_PER_CORE * cores:
        raise ConfigError(f"dist.nproc: {local_world_size} ranks on this machine, which has {cores} CPU cores; each "
                          f"rank is a process with its own model copy: use at most {MAX_RANKS_PER_CORE * cores} here, "
                          "or spread ranks over machines with distcomp launch --hostfile")


def select_device(cfg: DistConfig, local_rank: int) -> tuple[torch.device, str]:
    """``(device, backend)`` for a rank: a GPU and NCCL when CUDA is there (or asked for), else CPU and gloo."""
    cuda = torch.cuda.is_available()
    kind = cfg.device if cfg.device != "auto" else ("cuda" if cuda else "cpu")
    if kind == "cuda" and not cuda:
        raise ConfigError("dist.device: 'cuda' but torch sees no CUDA device; use --device cpu")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if kind == "cuda" else "gloo")
    if backend == "nccl" and (kind != "cuda" or not dist.is_nccl_available()):
        raise ConfigError("dist.backend: 'nccl' needs CUDA and a torch built with NCCL; use gloo")
    return (torch.device("cuda", local_rank) if kind == "cuda" else torch.device("cpu")), backend


def setup_logging(rank: int) -> None:
    """INFO from rank 0, warnings and errors from the others, each line tagged with its rank."""
    # tqdm's default lock holds a multiprocessing semaphore that leaks (with a warning) when a rank is killed.
    tqdm.set_lock(threading.RLock())
    root = logging.getLogger("distcomp")
    root.handlers[:] = [TqdmHandler()]
    fmt = "[distcomp] %(message)s" if rank == 0 else f"[distcomp rank {rank}] %(levelname)s: %(message)s"
    root.handlers[0].setFormatter(logging.Formatter(fmt))
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False


def run_rank(cfg: TrainConfig, resume: Path | None, place: Placement, init_method: str) -> int:
    """The life of one rank: process group, the job, barrier, teardown. Raises on failure."""
    setup_logging(place.rank)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(cfg.dist.threads or max(1, cores // place.local_world_size))
    device, backend = select_device(cfg.dist, place.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=place.rank, world_size=place.world_size,
                            timeout=datetime.timedelta(seconds=cfg.dist.timeout_s))
    ctx = RankContext(place.rank, place.world_size, device, backend, _STOP.is_set)
    code = rank_job(cfg, ctx, resume)
    dist.barrier()
    dist.destroy_process_group()
    return code


# -- joining a launcher's job ---------------------------------------------------------


def _join(cfg: TrainConfig, resume: Path | None, place: Placement) -> int:
    def on_sigint(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once
        _STOP.set()

    signal.signal(signal.SIGINT, on_sigint)
    try:
        return run_rank(cfg, resume, place, "env://")
    except BaseException as exc:  # noqa: BLE001 - report, then leave without running C++ teardown that may hang
        sys.stderr.write(f"{traceback.format_exc()}[distcomp rank {place.rank}] failed: {describe_failure(exc, cfg)}\n")
        _hard_exit(1)
    return 1


def describe_failure(exc: BaseException, cfg: TrainConfig) -> str:
    """One line for the user: the error, and what a collective timeout means."""
    text = f"{type(exc).__name__}: {exc}"
    if "timed out" in text.lower() or "timeout" in text.lower():
        text += (f" -- another rank did not answer within dist.timeout_s = {cfg.dist.timeout_s:g} s (it hung, died "
                 "or is far slower); raise dist.timeout_s if steps are legitimately that slow")
    return text


def _hard_exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# -- spawning local ranks --------------------------------------------------------------


def _spawn(cfg: TrainConfig, resume: Path | None) -> int:
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # all ranks are local: talk over loopback
    ctx = mp.get_context("spawn")
    world = cfg.dist.nproc
    with tempfile.TemporaryDirectory(prefix="distcomp-") as tmp:
        init = f"file://{os.path.join(tmp, 'store')}"
        pipes = [ctx.Pipe(duplex=False) for _ in range(world)]
        procs = [ctx.Process(target=_child, args=(cfg, resume, Placement(r, world, r, world), init, pipes[r][1]),
                             name=f"distcomp-rank{r}", daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        for _, send in pipes:
            send.close()  # the children hold the write ends
        try:
            return _supervise(procs, [recv for recv, _ in pipes])
        finally:
            _kill(procs)


def _child(cfg: TrainConfig, resume: Path | None, place: Placement, init: str, report: Connection) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into SIGUSR1
    signal.signal(signal.SIGUSR1, lambda signum, frame: _STOP.set())
    try:
        code = run_rank(cfg, resume, place, init)
    except BaseException as exc:  # noqa: BLE001 - the parent reports it and stops the other ranks
        report.send((place.rank, describe_failure(exc, cfg), traceback.format_exc(), time.time()))
        _hard_exit(1)
    sys.stdout.flush()
    sys.exit(code)


def _die_with_parent() -> None:
    """Ask Linux to kill this rank if the supervising process dies (so no rank is orphaned)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _supervise(procs: list, reports: list[Connection]) -> int:
    """Wait for the ranks; on the first failure kill the rest and report it. The exit code."""
    asked_to_stop = False
    open_reports = dict(enumerate(reports))
    while True:
        try:
            failure = _failure(procs, open_reports)
            if failure is not None:
                rank, message, tb = _root_cause(failure, open_reports)
                _kill(procs)
                sys.stderr.write(f"{tb}\n[distcomp] rank {rank} failed: {message}\n"
                                 "[distcomp] the other ranks were stopped\n")
                return 1
            live = [p.sentinel for p in procs if p.exitcode is None]
            if not live:
                codes = [p.exitcode for p in procs]
                return EXIT_INTERRUPTED if asked_to_stop or EXIT_INTERRUPTED in codes else 0
            wait(live + list(open_reports.values()), timeout=1.0)
        except KeyboardInterrupt:
            if asked_to_stop:
                _kill(procs)
                sys.stderr.write("\n[distcomp] killed\n")
                return EXIT_INTERRUPTED
            asked_to_stop = True
            sys.stderr.write("\n[distcomp] stopping after the current step (Ctrl-C again to kill)\n")
            for p in procs:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGUSR1)


Failure = tuple[int, str, str, float]
"""``(rank, message, traceback, time.time() when the rank caught it)``."""


def _failure(procs: list, reports: dict[int, Connection]) -> Failure | None:
    """The first error a rank reported, or a rank that died without a report; closed pipes leave ``reports``."""
    for rank, conn in list(reports.items()):
        try:
            if conn.poll():
                return conn.recv()
        except (EOFError, OSError):
            del reports[rank]  # the rank exited without a report (a success, or a crash caught below)
    for rank, p in enumerate(procs):
        if p.exitcode not in (None, 0, EXIT_INTERRUPTED):
            return rank, f"died with exit code {p.exitcode} without a report", "", time.time()
    return None


def _root_cause(first: Failure, reports: dict[int, Connection], grace_s: float = 1.0) -> tuple[int, str, str]:
    """Of the failures reported within ``grace_s`` of ``first``, the one that happened first.

    A rank that fails makes its peers fail too, at their next collective ("connection
    closed by peer"), and their reports can reach the pipes in either order: the
    earliest failure is the cause, the later ones its consequence.
    """
    found = [first]
    deadline = time.monotonic() + grace_s
    pending = {r: c for r, c in reports.items() if r != first[0]}
    while pending and (left := deadline - time.monotonic()) > 0:
        for conn in wait(list(pending.values()), timeout=left):
            rank = next(r for r, c in pending.items() if c is conn)
            del pending[rank]
            try:
                found.append(conn.recv())
            except (EOFError, OSError):
                pass  # exited without a report
    rank, message, tb, _ = min(found, key=lambda f: f[3])
    return rank, message, tb


def _kill(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(5)
