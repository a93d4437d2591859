"""Helpers for launcher tests that watch a running job: a launcher in the background, and the job's processes.

Every process of a job started from :func:`write_job` carries the job script's
path in its command line (watchdog, agent, ranks), so :func:`job_processes`
finds them all by walking ``/proc``, on this machine and in its network namespaces.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

JOB = """\
import datetime, os, sys, time
import torch.distributed as dist
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
print(f"READY rank={os.environ['RANK']}", flush=True)
for step in range(int(sys.argv[1])):
    if step < 5:  # then quiet: a job that writes to a closed pipe would die of SIGPIPE, hiding what is tested
        print(f"STEP rank={os.environ['RANK']} step={step}", flush=True)
    time.sleep(0.2)
dist.barrier()
dist.destroy_process_group()
"""


def write_job(folder: Path) -> Path:
    """A job script whose ranks join, print ``READY rank=R``, five ``STEP`` lines, then sleep; a unique path."""
    path = folder / f"job_{uuid.uuid4().hex[:12]}.py"
    path.write_text(JOB)
    return path


def job_processes(marker: str) -> dict[int, str]:
    """``pid -> command line`` of every live process whose command line holds ``marker`` (zombies excluded)."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != b"Z":
            found[int(entry)] = cmdline
    return found


def wait_until_gone(marker: str, timeout: float) -> dict[int, str]:
    """Wait up to ``timeout`` s for every process of the job to end; what is still there then."""
    deadline = time.monotonic() + timeout
    while (left := job_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def kill_all(marker: str) -> None:
    """SIGKILL whatever of the job is left (cleanup after a failed test)."""
    for pid in job_processes(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Launcher:
    """``distcomp launch`` running in the background, in a session of its own, its output read line by line."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, stdin_pipe: bool = False) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     cwd=cwd, start_new_session=True,
                                     stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL)
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._read, args=(stream, sink), daemon=True).start()

    @staticmethod
    def _read(stream: object, sink: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            sink.append(line)

    def wait_for_output(self, texts: list[str], timeout: float) -> None:
        """Wait until every one of ``texts`` appeared in stdout (fails with the launcher's stderr otherwise)."""
        deadline = time.monotonic() + timeout
        while not all(any(t in line for line in self.out) for t in texts):
            assert self.proc.poll() is None, "launcher exited early:\n" + "".join(self.err)[-4000:]
            assert time.monotonic() < deadline, f"no {texts} within {timeout} s:\n" + "".join(self.err)[-4000:]
            time.sleep(0.05)

    def close(self) -> None:
        """Kill the launcher if it still runs and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
