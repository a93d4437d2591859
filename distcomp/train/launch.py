"""How the ranks of ``distcomp train`` start, fail and stop.

* Under a launcher (``torchrun``, or anything that sets RANK and WORLD_SIZE)
  this process is one rank: it joins the job through ``env://``.
* Otherwise it spawns ``dist.nproc`` local ranks that meet through a TCP store it
  hosts on loopback, and supervises them (:mod:`distcomp.train.supervise`): when
  one fails, the others are killed at once and the job exits non-zero with the
  root cause (the rank that failed first, or died of a signal).
* Every check that can fail (config, device, data, checkpoint) runs before any
  rank starts. Every collective has ``dist.timeout_s``; on success each rank
  passes a barrier and destroys its process group before exiting (exiting right
  after DDP can otherwise abort with "terminate called without an active exception").
* Ctrl-C, SIGTERM, SIGHUP (:mod:`distcomp.train.stop`): the ranks finish the
  current step, agree to stop, write a checkpoint (when checkpoints are on) and
  the summary so far, and exit with 128 + the signal (130, 143, 129) within
  ``dist.stop_grace_s``. A second signal kills them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from distcomp import linux
from distcomp.errors import ConfigError
from distcomp.launch.proctree import die_with_parent
from distcomp.train import checkpoint, manifest, rundir
from distcomp.train import stop as stopping
from distcomp.train.config import DistConfig, TrainConfig
from distcomp.train.data import check_batches, load_corpus
from distcomp.train.job import rank_job
from distcomp.train.loop import Placement, RankContext
from distcomp.train.optim import first_compressed_step
from distcomp.train.stop import StopRequest
from distcomp.train.supervise import supervise
from distcomp.train.telemetry import TqdmHandler

logger = logging.getLogger("distcomp.train")
RESUME_AUTO = "auto"
"""``--resume auto``: the newest checkpoint of this config's run if there is one, else a fresh start."""


def under_launcher() -> bool:
    """True when a launcher (torchrun, mpirun wrappers, SLURM scripts) already made this process a rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch(cfg: TrainConfig, resume: str | Path | None) -> int:
    """Run ``distcomp train``: join the launcher's job or spawn local ranks; the process exit code."""
    if under_launcher():
        place = Placement(
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
            int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])),
        )
        stop = StopRequest()
        # No supervisor watches this rank: it bounds its own stop by the grace period.
        stopping.handle_in_rank(stop, grace_s=cfg.dist.stop_grace_s)
        path = preflight(cfg, resume, place.world_size, place.local_world_size)
        return _join(cfg, path, place, stop)
    stop = StopRequest(mp.get_context("spawn").RawValue("i", 0))
    stopping.handle_in_supervisor(stop)
    path = preflight(cfg, resume, cfg.dist.nproc, cfg.dist.nproc)
    return _spawn(cfg, path, stop)


def check_mesh(cfg: TrainConfig, world_size: int, local_world_size: int) -> None:
    """``hsdp``: the shard groups must tile the ranks (checked here so no rank starts on a mesh that cannot exist)."""
    if cfg.dist.parallel != "hsdp":
        return
    shard = cfg.dist.shard or local_world_size
    if world_size % shard:
        raise ConfigError(
            f"dist.shard: {shard} ranks per shard group do not divide the {world_size} ranks of this job"
            + ("" if cfg.dist.shard else " (0 means the ranks of one machine)")
            + f"; set dist.shard to a divisor of {world_size}, e.g. --set dist.shard={_divisor(world_size, shard)}"
        )


def _divisor(n: int, near: int) -> int:
    """The largest divisor of ``n`` not above ``near`` (a suggestion for a shard group size)."""
    return max(d for d in range(1, min(n, near) + 1) if n % d == 0)


def preflight(cfg: TrainConfig, resume: str | Path | None, world_size: int, local_world_size: int) -> Path | None:
    """Every check that needs no process group, then claim the run directory (:func:`rundir.prepare`).

    Raises :class:`ConfigError`/:class:`CheckpointError`. The checkpoint to resume
    from is verified against its manifest here, before any rank starts.
    """
    device, _ = select_device(cfg.dist, 0)
    if device.type == "cuda" and local_world_size > torch.cuda.device_count():
        raise ConfigError(
            f"dist.nproc: {local_world_size} ranks on this machine but only "
            f"{torch.cuda.device_count()} CUDA devices (one GPU per rank); or use --device cpu"
        )
    if device.type == "cpu":
        check_cpu_ranks(local_world_size)
    check_mesh(cfg, world_size, local_world_size)
    corpus = load_corpus(cfg.data, cfg.model.context)
    check_batches(corpus, cfg.model.context, cfg.data.batch_size, world_size)
    runs = cfg.runs()
    for spec in runs:
        first = first_compressed_step(cfg.optimizer, spec.optimizer)
        if first >= cfg.steps:
            logger.warning(
                "%s compresses from step %d (optimizer.%s.freeze_step) but the run has %d steps: "
                "it will only run its exact warm-up",
                spec.optimizer,
                first,
                spec.optimizer,
                cfg.steps,
            )
    auto = resume == RESUME_AUTO
    if auto:
        resume = _newest_checkpoint(cfg)
    if resume is None:
        rundir.prepare(cfg, fresh=True, nothing_to_resume=auto)
        return None
    path = manifest.resolve(resume)
    meta = checkpoint.read_meta(path)
    if len(runs) != 1:
        raise ConfigError(
            f"--resume continues one run, but compare lists {[r.name for r in runs]}; "
            f"add --set compare=[{meta['compressor']}] to resume the {meta['compressor']!r} run"
        )
    spec = runs[0]
    if meta["step"] > cfg.steps:
        raise ConfigError(
            f"--resume {path}: the checkpoint is at step {meta['step']}, beyond steps={cfg.steps}; "
            f"raise steps (--set steps=...)"
        )
    checkpoint.check_compatible(
        meta,
        path=path,
        world_size=world_size,
        compressor=spec.name,
        trajectory=checkpoint.trajectory_config(cfg, spec),
        data_fingerprint=corpus.fingerprint,
    )
    if meta.get("schedule_steps") != (cfg.optimizer.decay_steps or cfg.steps):
        logger.warning(
            "the learning-rate schedule was %s steps long and is now %s: the curve will not match an "
            "uninterrupted run (set optimizer.decay_steps to keep it)",
            meta.get("schedule_steps"),
            cfg.optimizer.decay_steps or cfg.steps,
        )
    rundir.prepare(cfg, fresh=False)
    return path


def _newest_checkpoint(cfg: TrainConfig) -> Path | None:
    """What ``--resume auto`` continues from: the newest intact checkpoint of the config's runs, or None (fresh).

    Damaged checkpoints are skipped with a warning saying what is wrong with them.
    """
    found = [p for spec in cfg.runs() if (p := manifest.newest(checkpoint.run_root(cfg, spec))) is not None]
    if not found:
        logger.info(
            "--resume auto: no checkpoint yet under %s; starting from step 0",
            ", ".join(str(checkpoint.run_root(cfg, spec)) for spec in cfg.runs()),
        )
        return None
    return max(found, key=lambda p: p.name)


MAX_RANKS_PER_CORE = 16
"""More CPU ranks than this per core only thrash: each is a process with its own copy of the model."""


def check_cpu_ranks(local_world_size: int) -> None:
    """Refuse a number of CPU ranks on this machine that could only exhaust it."""
    cores = os.cpu_count() or 1
    if local_world_size > MAX_RANKS_PER_CORE * cores:
        raise ConfigError(
            f"dist.nproc: {local_world_size} ranks on this machine, which has {cores} CPU cores; each "
            f"rank is a process with its own model copy: use at most {MAX_RANKS_PER_CORE * cores} here, "
            "or spread ranks over machines with distcomp launch --hostfile"
        )


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


def run_rank(
    cfg: TrainConfig, resume: Path | None, place: Placement, stop: StopRequest, store_port: int | None = None
) -> int:
    """The life of one rank: process group, the job, barrier, teardown. Raises on failure.

    The ranks meet through the TCP store on loopback ``store_port`` (spawned ranks)
    or through ``env://`` (a launcher's MASTER_ADDR and MASTER_PORT).
    """
    setup_logging(place.rank)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(cfg.dist.threads or max(1, cores // place.local_world_size))
    device, backend = select_device(cfg.dist, place.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=cfg.dist.timeout_s)
    meet: dict[str, Any] = (
        {"init_method": "env://"}
        if store_port is None
        else {"store": dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=timeout)}
    )
    dist.init_process_group(backend, rank=place.rank, world_size=place.world_size, timeout=timeout, **meet)
    ctx = RankContext(**dataclasses.asdict(place), device=device, backend=backend, stop_signal=stop.signal)
    code = rank_job(cfg, ctx, resume)
    dist.barrier()
    dist.destroy_process_group()
    return code


# -- joining a launcher's job ---------------------------------------------------------


def _join(cfg: TrainConfig, resume: Path | None, place: Placement, stop: StopRequest) -> int:
    try:
        return run_rank(cfg, resume, place, stop)
    except BaseException as exc:  # noqa: BLE001 - report, then leave without running C++ teardown that may hang
        sys.stderr.write(f"{traceback.format_exc()}[distcomp rank {place.rank}] failed: {describe_failure(exc, cfg)}\n")
        _hard_exit(1)
    return 1


def describe_failure(exc: BaseException, cfg: TrainConfig) -> str:
    """One line for the user: the error, and what a collective timeout means."""
    text = f"{type(exc).__name__}: {exc}"
    if "timed out" in text.lower() or "timeout" in text.lower():
        text += (
            f" -- another rank did not answer within dist.timeout_s = {cfg.dist.timeout_s:g} s (it hung, died "
            "or is far slower); raise dist.timeout_s if steps are legitimately that slow"
        )
    return text


def _hard_exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# -- spawning local ranks --------------------------------------------------------------


def _spawn(cfg: TrainConfig, resume: Path | None, stop: StopRequest) -> int:
    if stop.signal():
        sys.stderr.write(f"[distcomp] {stopping.signal_name(stop.signal())} before any rank started: nothing to stop\n")
        return stopping.exit_code(stop.signal())
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # all ranks are local: talk over loopback
    ctx = mp.get_context("spawn")
    world = cfg.dist.nproc
    with _loopback_store(cfg.dist.timeout_s) as port:
        pipes = [ctx.Pipe(duplex=False) for _ in range(world)]
        procs = [
            ctx.Process(
                target=_child,
                args=(cfg, resume, Placement(r, world, r, world), port, stop.shared, pipes[r][1], os.getpid()),
                name=f"distcomp-rank{r}",
                daemon=True,
            )
            for r in range(world)
        ]
        # The ranks start with the stop signals blocked and unblock them once their handlers are in. Start
        # multiprocessing's resource tracker first: starting it unblocks SIGINT and SIGTERM in this process.
        resource_tracker.ensure_running()
        with stopping.signals_blocked():
            for p in procs:
                p.start()
        for _, send in pipes:
            send.close()  # the children hold the write ends
        logger.info("started %d ranks on this machine (pids %s)", world, " ".join(str(p.pid) for p in procs))
        try:
            return supervise(procs, [recv for recv, _ in pipes], stop, cfg.dist.stop_grace_s)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()


@contextlib.contextmanager
def _loopback_store(timeout_s: float) -> Iterator[int]:
    """Host the ranks' rendezvous (a TCPStore) here, on 127.0.0.1 only; yields its port.

    A plain ``TCPStore("127.0.0.1", 0, is_master=True)`` listens on every interface,
    and the store has no authentication: bind the socket here and hand it over.
    Nothing is left on disk when this process is killed.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    # The store takes the descriptor over and closes it: detach so that Python does not close it too.
    store = dist.TCPStore(
        "127.0.0.1",
        port,
        is_master=True,
        master_listen_fd=sock.detach(),
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        yield port
    finally:
        del store


def _child(
    cfg: TrainConfig, resume: Path | None, place: Placement, port: int, shared: Any, report: Connection, supervisor: int
) -> None:
    with contextlib.suppress(OSError):  # not Linux: no such safety net
        die_with_parent(signal.SIGKILL, supervisor)()  # so that no rank is orphaned
    _name_process(f"distcomp-rank{place.rank}")
    stop = StopRequest(shared)
    stopping.handle_in_rank(stop)
    stopping.unblock()  # blocked by the parent around start(): a signal during start-up waited for the handlers
    try:
        code = run_rank(cfg, resume, place, stop, port)
    except BaseException as exc:  # noqa: BLE001 - the parent reports it and stops the other ranks
        report.send((place.rank, describe_failure(exc, cfg), traceback.format_exc(), time.time()))
        _hard_exit(1)
    sys.stdout.flush()
    sys.exit(code)


def _name_process(name: str) -> None:
    """Show ``name`` for this process in ps, top and /proc/PID/comm (15 bytes at most)."""
    with contextlib.suppress(OSError):  # not Linux: no names in ps
        linux.prctl(linux.PR_SET_NAME, name.encode()[:15])
