"""``distcomp train`` stopped by a signal at any moment, and a killed rank blamed by name.

Real processes on gloo, each test under a hard timeout: the job is started the
way a user starts it, signalled the way a terminal, a container runtime, SLURM
or torchrun signals it, and its exit code, output and files are checked.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_train import QUICKSTART, ROOT, TINY, env, sets, summary

from distcomp import cli
from distcomp.train.supervise import oom_kills

LONG = {**TINY, "steps": 100000, "compare": "[]", "checkpoint.every": 1000}
"""A run that only a signal ends, with checkpoints on (one is due at the stop)."""


def _default_signals() -> None:
    # A terminal delivers these to a command that does not ignore them; a test runner started in the
    # background may ignore SIGINT, and its children would inherit that.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


class Job:
    """A running ``distcomp train`` (or any command) in its own process group; stderr is read as it comes."""

    def __init__(self, args: list[str], out: Path, **extra_env: str) -> None:
        self.out = out
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=out.open("w"), stderr=subprocess.PIPE, text=True,
                                     env=env(**extra_env), start_new_session=True,
                                     preexec_fn=_default_signals)  # noqa: PLW1509 - before any thread
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self.reader.start()

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 90) -> re.Match:
        """The first stderr match of ``pattern``; fails when the job ends or ``timeout`` passes first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = re.search(pattern, self.stderr)
            if found:
                return found
            assert self.proc.poll() is None, f"ended before {pattern!r}:\n{self.stderr}"
            time.sleep(0.02)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.stderr}")

    def rank_pids(self) -> list[int]:
        """The pids of the spawned ranks, in rank order, as the supervisor logs them."""
        return [int(p) for p in self.wait_for(r"started \d+ ranks on this machine \(pids ([\d ]+)\)")[1].split()]

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        """``(exit code, stdout, stderr)``; the whole group is killed if it outlives ``timeout``."""
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.reader.join(10)
        return code, self.out.read_text(), self.stderr


def start_train(tmp_path: Path, extra: dict[str, object] | None = None, **extra_env: str) -> Job:
    args = [sys.executable, "-m", "distcomp", "train", QUICKSTART, "--quiet",
            *sets({**LONG, "log.dir": tmp_path / "runs", **(extra or {})})]
    return Job(args, tmp_path / "stdout.txt", **extra_env)


def send(job: Job, signum: int, to: str) -> None:
    """``to``: 'supervisor' (a container stop: PID 1 only) or 'group' (a terminal, SLURM: every process)."""
    if to == "group":
        os.killpg(job.proc.pid, signum)
    else:
        os.kill(job.proc.pid, signum)


def assert_clean_stop(tmp_path: Path, code: int, stdout: str, stderr: str, expected: int) -> None:
    assert code == expected, stderr
    assert "(interrupted)" in stdout and "final val loss" in stdout
    assert "failed" not in stderr and "Traceback" not in stderr and "terminate called" not in stderr
    assert summary(tmp_path, "quickstart")["runs"][0]["interrupted"] is True
    assert list((tmp_path / "runs" / "quickstart" / "powersgd" / "checkpoints").glob("step_*"))


@pytest.mark.slow
@pytest.mark.parametrize("signum, to", [(signal.SIGTERM, "supervisor"), (signal.SIGHUP, "supervisor"),
                                        (signal.SIGTERM, "group")],
                         ids=["sigterm-container-stop", "sighup", "sigterm-slurm-every-process"])
def test_sigterm_and_sighup_stop_like_ctrl_c_with_checkpoint_summary_and_128_plus_signal(
        tmp_path: Path, signum: int, to: str) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    job = start_train(tmp_path, TMPDIR=str(tmp))
    job.wait_for(r"step 3/")
    send(job, signum, to)
    start = time.monotonic()
    code, stdout, stderr = job.finish()
    assert time.monotonic() - start < 30
    assert_clean_stop(tmp_path, code, stdout, stderr, 128 + signum)
    assert f"{signal.Signals(signum).name}: stopping after the current step" in stderr
    assert not list(tmp.glob("distcomp-*"))


@pytest.mark.slow
@pytest.mark.parametrize("signum, delay_s", [(signal.SIGINT, 0.0), (signal.SIGINT, 1.0), (signal.SIGTERM, 0.0),
                                             (signal.SIGTERM, 2.5)],
                         ids=["ctrl-c-at-start", "ctrl-c-during-start-up", "sigterm-at-start",
                              "sigterm-during-start-up"])
def test_a_stop_at_any_moment_of_start_up_is_a_clean_stop(tmp_path: Path, signum: int, delay_s: float) -> None:
    job = start_train(tmp_path)
    job.rank_pids()  # the ranks were just started: they are importing torch, not yet training
    time.sleep(delay_s)
    send(job, signum, "group" if signum == signal.SIGINT else "supervisor")  # Ctrl-C reaches every process
    code, stdout, stderr = job.finish(timeout=90)
    assert_clean_stop(tmp_path, code, stdout, stderr, 128 + signum)
    assert "KeyboardInterrupt" not in stderr and "exit code" not in stderr


@pytest.mark.slow
@pytest.mark.timeout(3 * (90 + 90 + 60) + 30)  # three trials of rank_pids, wait_for, finish: above the slow limit
def test_a_rank_killed_mid_run_is_blamed_with_its_signal_not_the_peer_it_disconnected(tmp_path: Path) -> None:
    for trial in range(3):  # the reports race: a wrong ordering shows within a few trials (each rank a victim)
        victim = trial % 2
        (tmp_path / str(trial)).mkdir()
        job = start_train(tmp_path / str(trial))
        pids = job.rank_pids()
        job.wait_for(r"step 2/")
        assert Path(f"/proc/{pids[victim]}/comm").read_text().strip() == f"distcomp-rank{victim}"
        os.kill(pids[victim], signal.SIGKILL)
        code, _, stderr = job.finish()
        assert code == 1, stderr
        assert f"rank {victim} was killed by SIGKILL" in stderr, (trial, stderr)
        assert f"rank {1 - victim} failed" not in stderr, (trial, stderr)
        assert "the other ranks were stopped" in stderr


@pytest.mark.slow
def test_ranks_that_do_not_stop_within_the_grace_period_are_killed_and_it_says_so(tmp_path: Path) -> None:
    job = start_train(tmp_path, {"dist.stop_grace_s": 2, "dist.timeout_s": 90}, DISTCOMP_TEST_FAULT="1:3:hang")
    job.wait_for(r"injected hang")
    send(job, signal.SIGTERM, "supervisor")
    start = time.monotonic()
    code, _, stderr = job.finish()
    assert time.monotonic() - start < 20  # the grace period, not the 90 s collective timeout
    assert code == 143, stderr
    assert "the ranks did not stop within dist.stop_grace_s = 2 s; killed them" in stderr


def _listening(pids: list[int]) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) of the TCP sockets these processes listen on."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd) if fd.is_symlink() else ""
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(fields[1].split(":")[0])
    return found


@pytest.mark.slow
def test_the_rendezvous_listens_on_loopback_only_and_a_killed_supervisor_leaves_no_temp_dir(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    job = start_train(tmp_path, TMPDIR=str(tmp))
    ranks = job.rank_pids()
    job.wait_for(r"step 2/")
    store = _listening([job.proc.pid])
    assert store, "the supervisor hosts the rendezvous store"
    loopback = ("0100007F", "00000000000000000000000001000000")  # 127.0.0.1, ::1
    assert all(addr in loopback for addr in store + _listening(ranks)), store + _listening(ranks)
    os.kill(job.proc.pid, signal.SIGKILL)
    job.finish()
    end = time.monotonic() + 20
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in ranks):
        assert time.monotonic() < end, "the ranks outlived their supervisor"
        time.sleep(0.1)
    assert not list(tmp.glob("distcomp-*"))


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def _launcher_rank(tmp_path: Path, rank: int, port: int, extra: dict[str, object] | None = None,
                   **extra_env: str) -> Job:
    args = [sys.executable, "-m", "distcomp", "train", QUICKSTART, "--quiet",
            *sets({**LONG, "log.dir": tmp_path / "runs", **(extra or {})})]
    return Job(args, tmp_path / f"stdout{rank}.txt", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
               LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
               **extra_env)


@pytest.mark.slow
def test_under_a_launcher_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    from test_train import _free_port

    port = _free_port()
    jobs = [_launcher_rank(tmp_path, r, port) for r in range(2)]
    jobs[0].wait_for(r"step 3/")
    os.kill(jobs[1].proc.pid, signal.SIGTERM)  # one rank only: the other learns it at the next step
    results = [j.finish() for j in jobs]
    assert [r[0] for r in results] == [143, 143], results[0][2] + results[1][2]
    assert_clean_stop(tmp_path, *results[0], 143)
    stopped = {re.search(r"stopped at step (\d+) on SIGTERM", r[2])[1] for r in results}
    assert len(stopped) == 1  # both ranks at the same step


@pytest.mark.slow
def test_under_a_launcher_a_rank_stuck_in_a_collective_exits_after_the_grace_period(tmp_path: Path) -> None:
    from test_train import _free_port

    port = _free_port()
    extra = {"dist.stop_grace_s": 2, "dist.timeout_s": 90, "dist.overlap": "false"}  # blocked in C++, not Python
    jobs = [_launcher_rank(tmp_path, r, port, extra, DISTCOMP_TEST_FAULT="1:3:hang") for r in range(2)]
    jobs[1].wait_for(r"injected hang")
    start = time.monotonic()
    for job in jobs:  # as SLURM does: rank 0 is blocked in the step's all-reduce, waiting for rank 1
        os.kill(job.proc.pid, signal.SIGTERM)
    results = [j.finish() for j in jobs]
    assert time.monotonic() - start < 30  # the grace period, not the 90 s collective timeout
    for code, _, stderr in results:
        assert code == 143, stderr
        assert "SIGTERM: this rank did not stop within dist.stop_grace_s = 2 s" in stderr


@pytest.mark.slow
def test_torchrun_stopped_with_sigterm_forwards_it_and_the_ranks_checkpoint_and_summarize(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "distcomp", "train", QUICKSTART, "--quiet", *sets({**LONG, "log.dir": tmp_path / "runs"})]
    job = Job(args, tmp_path / "stdout.txt", OMP_NUM_THREADS="1")
    job.wait_for(r"step 3/")
    os.kill(job.proc.pid, signal.SIGTERM)  # torchrun passes it on to its workers
    _, stdout, stderr = job.finish()
    assert "(interrupted)" in stdout and "stopped at step" in stderr
    assert summary(tmp_path, "quickstart")["runs"][0]["interrupted"] is True
    assert list((tmp_path / "runs" / "quickstart" / "powersgd" / "checkpoints").glob("step_*"))


def test_oom_kills_reads_cgroup_v2_and_v1_counters(tmp_path: Path) -> None:
    v2, v1 = tmp_path / "memory.events", tmp_path / "memory.oom_control"
    v2.write_text("low 0\nhigh 0\nmax 4\noom 2\noom_kill 3\noom_group_kill 0\n")
    v1.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 7\n")
    assert oom_kills([tmp_path / "missing", v2]) == 3
    assert oom_kills([v1]) == 7
    assert oom_kills([tmp_path / "missing"]) is None
    assert oom_kills() is None or oom_kills() >= 0  # this machine's own cgroup, when it exposes one


def test_stop_grace_period_must_be_positive(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["train", QUICKSTART, "--set", "dist.stop_grace_s=0"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "stop_grace_s" in err and "must be > 0, got 0" in err
