"""No process of a job outlives ``distcomp launch``: SIGKILL (the OOM killer) or SIGHUP (terminal, ssh session gone).

Real jobs, real signals: a 2-rank job runs, the launcher is killed or hung up
on mid-run, and within seconds no watchdog, agent or rank of the job may be
left, locally and on two "hosts" (network namespaces reached through the ssh
stand-in of :mod:`launch_netns`).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from launch_jobs import Launcher, job_processes, kill_all, wait_until_gone, write_job
from launch_netns import NetHost, install_ssh_standin, write_hostfile

pytestmark = pytest.mark.slow  # every test launches a job

ROOT = Path(__file__).resolve().parents[2]
GONE_WITHIN_S = 15.0
"""Stop timeout (5 s) plus the time torch's agent takes to stop its workers, with room for a busy machine."""
SIGNALS = [pytest.param(signal.SIGKILL, id="SIGKILL"), pytest.param(signal.SIGHUP, id="SIGHUP")]


def env(path_first: Path | None = None) -> dict[str, str]:
    path = f"{path_first}:{os.environ['PATH']}" if path_first else os.environ["PATH"]
    return {**os.environ, "PATH": path, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def launch_argv(*options: str) -> list[str]:
    return [sys.executable, "-m", "distcomp", "launch", "--stop-timeout", "5", *options]


def kill_launcher_mid_run(launcher: Launcher, job: Path, signum: int) -> None:
    """Wait for both ranks, check the job's processes exist, send ``signum`` to the launcher alone; assert all gone."""
    marker = job.name
    try:
        launcher.wait_for_output(["STEP rank=0 step=4", "STEP rank=1 step=4"], timeout=120)  # the last lines
        assert len(job_processes(marker)) >= 5  # launcher, watchdog(s), agent(s), two ranks
        os.kill(launcher.proc.pid, signum)
        left = wait_until_gone(marker, GONE_WITHIN_S)
        assert not left, f"still running {GONE_WITHIN_S} s after {signal.Signals(signum).name}:\n" + "\n".join(
            f"{pid}: {cmd[:200]}" for pid, cmd in left.items()) + "\n" + "".join(launcher.err)[-3000:]
    finally:
        launcher.close()
        kill_all(marker)


@pytest.mark.parametrize("signum", SIGNALS)
def test_a_local_job_dies_with_its_launcher(tmp_path: Path, signum: int) -> None:
    job = write_job(tmp_path)
    launcher = Launcher(launch_argv("--nproc-per-node", "2", str(job), "100000"), env(), ROOT)
    kill_launcher_mid_run(launcher, job, signum)
    if signum == signal.SIGHUP:
        assert launcher.proc.returncode == 130, "".join(launcher.err)[-3000:]  # stopped like Ctrl-C


@pytest.mark.parametrize("signum", SIGNALS)
def test_a_job_over_ssh_dies_with_its_launcher(tmp_path: Path, hosts: tuple[NetHost, NetHost], signum: int) -> None:
    standin = install_ssh_standin(tmp_path / "bin").parent
    hostfile = write_hostfile(tmp_path / "hosts", hosts)
    job = write_job(tmp_path)
    launcher = Launcher(launch_argv("--hostfile", str(hostfile), "--launcher", "ssh", str(job), "100000"),
                        env(standin), ROOT)
    kill_launcher_mid_run(launcher, job, signum)


def test_the_watchdog_stops_its_agent_and_the_agents_orphans_when_its_stdin_closes(tmp_path: Path) -> None:
    """What the launcher's pipe does for every node: EOF on the watchdog's stdin ends the whole tree below it."""
    marker = f"orphan_{os.getpid()}_{tmp_path.name}"
    # The "agent" starts a grandchild in a session of its own (as torch starts workers) and ignores SIGTERM.
    agent = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', sys.argv[1]], "
             "start_new_session=True); print('up', flush=True); time.sleep(300)")
    watchdog = Launcher([sys.executable, "-m", "distcomp.launch.watchdog", "--grace", "1", "--",
                         sys.executable, "-c", agent, marker], env(), ROOT, stdin_pipe=True)
    try:
        watchdog.wait_for_output(["up"], timeout=60)
        assert len(job_processes(marker)) == 3  # watchdog, agent, grandchild
        watchdog.proc.stdin.close()
        left = wait_until_gone(marker, 10)
        assert not left, left
        assert watchdog.proc.wait(10) == -signal.SIGKILL  # the agent's fate is the watchdog's exit status
    finally:
        watchdog.close()
        kill_all(marker)
