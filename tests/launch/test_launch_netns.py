"""``distcomp launch`` across two hosts: network namespaces on this machine, reached through an ssh stand-in.

Real processes end to end: the launcher runs ``ssh HOST ...`` (the stand-in runs
the command inside namespace HOST), one torchrun agent per namespace, c10d
rendezvous on the first one, ``distcomp train`` as the workers. Skipped only
where namespaces cannot be created.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from launch_netns import NetHost, install_ssh_standin, write_hostfile
from test_train import QUICKSTART, sets
from test_train import TINY as TRAIN_TINY

pytestmark = pytest.mark.slow  # two hosts in network namespaces

ROOT = Path(__file__).resolve().parents[2]
PROBE = str(Path(__file__).with_name("launch_train_probe.py"))
TINY = {**TRAIN_TINY, "dist.timeout_s": 20, "compare": "[]"}


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the ssh stand-in, to put first on PATH."""
    folder = tmp_path_factory.mktemp("bin")
    install_ssh_standin(folder)
    return folder


def launcher_env(standin: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{standin}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1"}


def launch_argv(hostfile: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "distcomp", "launch", "--hostfile", str(hostfile), "--stop-timeout", "15", *options]


def train_argv(tmp: Path, extra: dict[str, object], *probe_options: str) -> list[str]:
    return ["--", PROBE, str(tmp / "probe"), *probe_options, "train", QUICKSTART, "--quiet",
            *sets({**TINY, "log.dir": tmp / "runs", **extra})]


def params(tmp: Path, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(tmp / "probe" / f"params-rank{rank}.pt", weights_only=True)


def test_two_node_train_through_the_hostfile_ends_with_identical_parameters(
        tmp_path: Path, hosts: tuple[NetHost, NetHost], standin: Path) -> None:
    hostfile = write_hostfile(tmp_path / "hosts", hosts)
    argv = launch_argv(hostfile) + train_argv(tmp_path, {"steps": 6, "name": "two"})
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=launcher_env(standin), cwd=ROOT)
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"launching 2 rank(s) on 2 node(s) (ssh): {hosts[0].name}, {hosts[1].name}" in out.stderr
    assert f"{hosts[0].name}: [rank 0] distcomp train two: 2 ranks (gloo, cpu)" in out.stdout
    probes = [json.loads(p.read_text()) for p in sorted((tmp_path / "probe").glob("pid-*.json"))]
    assert sorted((p["host"], p["node"]) for p in probes) == [(hosts[0].name, "0"), (hosts[1].name, "1")]
    a, b = params(tmp_path, 0), params(tmp_path, 1)
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(json.loads((tmp_path / "runs" / "two" / "summary.json").read_text())["runs"][0]["losses"]) == 6


class _Job:
    """A launcher running in the background whose stderr is read line by line."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     cwd=ROOT, start_new_session=True)
        self.err: list[str] = []
        self.out: list[str] = []
        self._threads = [threading.Thread(target=self._read, args=(s, sink), daemon=True)
                         for s, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream: object, sink: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            sink.append(line)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.err):
            assert self.proc.poll() is None, "".join(self.err)[-4000:]
            assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n" + "".join(self.err)[-4000:]
            time.sleep(0.05)

    def finish(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        for t in self._threads:
            t.join(10)
        return code

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def digest(self) -> str:
        """The launcher's stderr without step logs and traceback frames (for assertion messages)."""
        noise = ("  File ", "^^^", " step ", "socket.cpp")
        return "".join(line for line in self.err if not any(n in line for n in noise))[-6000:]


def kill_worker_on_node(tmp: Path, node: str, attempt: int = 0) -> dict:
    for path in (tmp / "probe").glob(f"pid-rank*-try{attempt}.json"):
        info = json.loads(path.read_text())
        if info["node"] == node:
            os.kill(info["pid"], 9)
            return info
    raise AssertionError(f"no worker of node {node} found in {sorted((tmp / 'probe').iterdir())}")


def test_a_killed_worker_makes_the_survivor_exit_non_zero_within_the_timeout(
        tmp_path: Path, hosts: tuple[NetHost, NetHost], standin: Path) -> None:
    hostfile = write_hostfile(tmp_path / "hosts", hosts)
    job = _Job(launch_argv(hostfile) + train_argv(tmp_path, {"steps": 100000, "name": "kill"}),
               launcher_env(standin))
    job.wait_for("step 3/", timeout=90)
    kill_worker_on_node(tmp_path, "1")
    killed = time.monotonic()
    code = job.finish(timeout=90)
    assert time.monotonic() - killed < 60
    assert code in (10, 11), job.digest()
    first = code - 10
    assert f"node {first} ({hosts[first].name}) failed first" in job.stderr
    assert f"launcher exit code {code}" in job.stderr
    assert f"node {1 - first} ({hosts[1 - first].name}):" in job.stderr  # what became of the other one


def test_with_max_restarts_and_checkpoints_the_job_resumes_and_finishes(
        tmp_path: Path, hosts: tuple[NetHost, NetHost], standin: Path) -> None:
    hostfile = write_hostfile(tmp_path / "hosts", hosts)
    job = _Job(launch_argv(hostfile, "--max-restarts", "1")
               + train_argv(tmp_path, {"steps": 80, "name": "resume", "checkpoint.every": 10}) + ["--resume", "auto"],
               launcher_env(standin))
    job.wait_for("checkpoint written", timeout=120)
    kill_worker_on_node(tmp_path, "1")
    code = job.finish(timeout=150)
    assert code == 0, job.digest()
    assert "resumed from" in job.stderr
    assert sorted(p.name for p in (tmp_path / "probe").glob("pid-*-try1.json")) == [
        "pid-rank0-try1.json", "pid-rank1-try1.json"]  # both nodes restarted their worker
    summary = json.loads((tmp_path / "runs" / "resume" / "summary.json").read_text())
    assert summary["runs"][0]["steps"] == 80
    a, b = params(tmp_path, 0), params(tmp_path, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_port_in_use_on_the_first_host_is_a_clear_error(tmp_path: Path, hosts: tuple[NetHost, NetHost],
                                                          standin: Path) -> None:
    hostfile = write_hostfile(tmp_path / "hosts", hosts)
    listener = subprocess.Popen(["ip", "netns", "exec", hosts[0].name, sys.executable, "-c",
                                 "import socket, time; s = socket.socket(); s.bind(('', 29613)); s.listen(); "
                                 "print('up', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "up"
        out = subprocess.run(launch_argv(hostfile, "--master-port", "29613", "train.py"), capture_output=True,
                             text=True, timeout=50, env=launcher_env(standin), cwd=ROOT)
    finally:
        listener.kill()
        listener.wait()
    assert out.returncode == 3
    assert f"port 29613 is already in use on host {hosts[0].name}" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_failing_ssh_check_names_the_host_and_the_command(tmp_path: Path, standin: Path) -> None:
    (tmp_path / "hosts").write_text("no-such-host slots=1\n")
    out = subprocess.run(launch_argv(tmp_path / "hosts", "train.py"), capture_output=True, text=True, timeout=50,
                         env=launcher_env(standin), cwd=ROOT)
    assert out.returncode == 3, out.stderr
    assert "ssh check of host no-such-host failed" in out.stderr
    assert "command: ssh -o BatchMode=yes -o ConnectTimeout=10 no-such-host" in out.stderr
    assert "Traceback" not in out.stderr
