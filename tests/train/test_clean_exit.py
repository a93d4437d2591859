"""A finished job exits cleanly whether or not the user calls ``state.close()``.

Each case runs ``tests/train/clean_exit_job.py`` (a user's script: DDP, one distcomp
line, a few steps) under torchrun, several jobs at once, and checks that every
job exits with status 0, that no rank printed "terminate called", and that
distcomp's worker thread and the gloo threads of its process group were gone
before the interpreter began to finalize (after that, a gloo thread that takes
the GIL aborts the process).

Each case runs once. The abort is a race, but the thread count is not: a rank
whose threads outlive distcomp's exit handler fails its job on every run, so a
second round would only double the test's time (its rank processes, each
starting torch, are nearly all of it).
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # torchrun jobs of a user's script

ROOT = Path(__file__).resolve().parents[2]
JOB = str(Path(__file__).with_name("clean_exit_job.py"))
THREADS = re.compile(r"threads at exit: (\d+) of (\d+)")

# (compressor, how the script ends, extra arguments): every way a user's script leaves.
CASES = [
    ("powersgd", "destroy", ()),  # barrier + destroy_process_group(), no close()
    ("sign", "destroy", ("--global",)),  # the same, state and model alive to the end
    ("sign", "nothing", ()),  # no teardown at all
    ("powersgd", "close", ("--global",)),
    ("sign", "destroy", ("--no-overlap",)),
]
PARALLEL = 3


def run_job(compressor: str, ending: str, extra: tuple[str, ...], tmp: Path) -> subprocess.CompletedProcess:
    """One 2-rank torchrun job of the user's script."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           JOB, compressor, ending, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=150)


def problems(out: subprocess.CompletedProcess) -> list[str]:
    """What is wrong with one finished job (nothing when it exited cleanly)."""
    found = []
    if out.returncode != 0:
        found.append(f"exit status {out.returncode}")
    if "terminate called" in out.stderr:
        found.append("a rank aborted: 'terminate called'")
    counts = THREADS.findall(out.stderr)
    if len(counts) != 2:
        found.append(f"expected a thread report from both ranks, got {counts}")
    found += [f"{left} threads left at exit, {before} before distcomp" for left, before in counts
              if int(left) > int(before)]
    return found


def test_every_job_exits_cleanly_with_or_without_close(tmp_path: Path) -> None:
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        outs = list(pool.map(lambda case: run_job(*case, tmp_path), CASES))
    failures = {" ".join([c, e, *x]): (found, out.stderr[-2000:])
                for (c, e, x), out in zip(CASES, outs) if (found := problems(out))}
    assert not failures, "\n".join(f"{name}: {found}\n{err}" for name, (found, err) in failures.items())
