"""Run a function on several real processes over gloo, with a hard timeout.

The project's own spawn helper (``torch.testing._internal`` has no
compatibility promise). Used by the test suite and the benchmarks::

    results = run_ranks(fn, world_size=2, args=(...,), timeout=120)

``fn(rank, world_size, *args)`` runs in a fresh process with the default process
group initialised on gloo (collective timeout ``collective_timeout`` seconds);
its return value comes back in rank order. An exception in any rank, or a rank
that does not finish within ``timeout`` seconds, raises in the caller and every
process is killed: a broken test fails, it never hangs.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any


class RankFailed(RuntimeError):
    """A rank raised, died, or ran out of time."""


def _entry(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    store: str,
    coll_timeout: float,
    args: tuple,
    results: Any,
    allow_exit: bool,
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=coll_timeout),
        )
        out = fn(rank, world_size, *args)
        if allow_exit:
            # A peer may be gone: no teardown collective, which would only time out.
            results.put(pickle.dumps((rank, "ok", out)))
            results.close()
            results.join_thread()
            os._exit(0)
        # Barrier before teardown: exiting right after DDP can abort the process.
        dist.barrier()
        dist.destroy_process_group()
        # Plain pickle copies tensors by value; the queue's own pickler would share
        # them through file descriptors that die with this process.
        results.put(pickle.dumps((rank, "ok", out)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        results.put(pickle.dumps((rank, "error", traceback.format_exc())))


def run_ranks(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: tuple = (),
    timeout: float = 180.0,
    collective_timeout: float = 60.0,
    allow_exit: bool = False,
) -> list[Any]:
    """``[fn(0, world_size, *args), fn(1, ...), ...]``, each on its own process.

    With ``allow_exit`` a rank that exits without reporting (a simulated crash)
    gives ``None`` instead of failing the call.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(
                target=_entry,
                args=(fn, r, world_size, store, collective_timeout, args, results, allow_exit),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        try:
            return _collect(procs, results, world_size, timeout, allow_exit)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(5)


def _collect(procs: list, results: Any, world_size: int, timeout: float, allow_exit: bool) -> list[Any]:
    deadline = time.monotonic() + timeout
    got: dict[int, Any] = {}
    errors: dict[int, str] = {}
    while len(got) + len(errors) < world_size:
        left = deadline - time.monotonic()
        if left <= 0:
            missing = sorted(set(range(world_size)) - set(got) - set(errors))
            raise RankFailed(f"ranks {missing} did not finish within {timeout:.0f}s" + _fmt(errors))
        try:
            rank, status, payload = pickle.loads(results.get(timeout=min(left, 1.0)))
        except queue.Empty:
            dead = [i for i, p in enumerate(procs) if not p.is_alive() and i not in got and i not in errors]
            if dead and results.empty():
                time.sleep(0.5)
                if not results.empty():
                    continue
                if not allow_exit:
                    raise RankFailed(
                        f"ranks {dead} died (exit codes {[procs[i].exitcode for i in dead]})" + _fmt(errors)
                    ) from None
                got.update(dict.fromkeys(dead))
            continue
        (got if status == "ok" else errors)[rank] = payload
    if errors:
        raise RankFailed(_fmt(errors))
    for p in procs:
        p.join(max(deadline - time.monotonic(), 1.0))
    return [got[r] for r in range(world_size)]


def _fmt(errors: dict[int, str]) -> str:
    return "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
