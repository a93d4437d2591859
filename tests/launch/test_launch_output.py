"""Every line every rank prints reaches the user whole, tagged with its rank (and host, over ssh).

Two ranks print thousands of lines at the same time as fast as they can, in
block-sized writes that end mid-line, and a last line without its newline;
several runs, because a glued or split line shows up only in some of them.
The local runs go at once: each spends most of its time in the launcher's chain
of interpreters (launcher, watchdog, agent) starting one after another, on one
core at a time.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from launch_netns import NetHost, install_ssh_standin, write_hostfile

pytestmark = pytest.mark.slow  # every test launches a job

ROOT = Path(__file__).resolve().parents[2]
LINES = 3000
RUNS = 3
# The barriers make both ranks write at once; flushing every 400 lines leaves block-sized writes that end mid-line.
# They are files in the folder named by the first argument (the hosts share the file system), not torch's: a rank
# that imports torch spends longer starting than writing.
CHATTER = f"""\
import os, sys, time
from pathlib import Path
rank, world, marks = os.environ["RANK"], int(os.environ["WORLD_SIZE"]), Path(sys.argv[1])
def barrier(name):
    (marks / f"{{name}}{{rank}}").touch()
    deadline = time.monotonic() + 60
    while len(list(marks.glob(f"{{name}}*"))) < world:
        if time.monotonic() > deadline:
            sys.exit(f"rank {{rank}}: the other rank never reached barrier {{name!r}}")
        time.sleep(0.001)
barrier("start")
for i in range({LINES}):
    print(f"LINE rank={{rank}} i={{i}} " + "x" * (i % 97), flush=i % 400 == 0)
    if i % 500 == 0:
        print(f"ERR rank={{rank}} i={{i}}", file=sys.stderr)
print(f"LAST rank={{rank}}", end="")
sys.stdout.flush()
barrier("done")
"""
WHOLE = re.compile(r"^(?:(?P<host>\S+): )?\[rank (?P<rank>\d)\] (?:LINE rank=(?P=rank) i=(?P<i>\d+) (?P<x>x*)"
                   r"|LAST rank=(?P=rank))$")


def env(path_first: Path | None = None) -> dict[str, str]:
    path = f"{path_first}:{os.environ['PATH']}" if path_first else os.environ["PATH"]
    return {**os.environ, "PATH": path, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def check_whole(stdout: str, stderr: str, hosts: dict[str, str] | None = None) -> None:
    """Every stdout line parses whole; each rank's lines are all there, in order; its host is the right one."""
    seen: Counter[str] = Counter()
    for line in stdout.splitlines():
        match = WHOLE.match(line)
        assert match, f"not a whole line: {line[:300]!r}"
        rank = match["rank"]
        if hosts is not None:
            assert match["host"] == hosts[rank], line
        if match["i"] is not None:
            i = int(match["i"])
            assert i == seen[rank] and len(match["x"]) == i % 97, line
            seen[rank] += 1
    assert seen == {"0": LINES, "1": LINES}, seen
    assert all(f"[rank {r}] LAST rank={r}" in stdout for r in "01")
    for r in "01":
        assert sum(f"[rank {r}] ERR rank={r} i=" in line for line in stderr.splitlines()) == LINES // 500


def chatter(folder: Path) -> list[str]:
    """The chatter script in ``folder``, and a fresh folder for its barriers: its arguments to the launcher."""
    script = folder / "chatter.py"
    script.write_text(CHATTER)
    marks = folder / "marks"
    marks.mkdir()
    return [str(script), str(marks)]


def launch_local(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distcomp", "launch", "--nproc-per-node", "2", *chatter(folder)],
                          capture_output=True, text=True, timeout=70, env=env(), cwd=ROOT)


def test_local_ranks_lines_arrive_whole_and_tagged(tmp_path: Path) -> None:
    folders = [tmp_path / f"run{n}" for n in range(RUNS)]
    for folder in folders:
        folder.mkdir()
    with concurrent.futures.ThreadPoolExecutor(RUNS) as pool:
        outs = list(pool.map(launch_local, folders))
    for out in outs:
        assert out.returncode == 0, out.stderr[-3000:]
        check_whole(out.stdout, out.stderr)


def test_lines_over_ssh_arrive_whole_and_tagged_with_host_and_rank(tmp_path: Path,
                                                                   hosts: tuple[NetHost, NetHost]) -> None:
    standin = install_ssh_standin(tmp_path / "bin").parent
    hostfile = write_hostfile(tmp_path / "hosts", hosts)
    out = subprocess.run([sys.executable, "-m", "distcomp", "launch", "--hostfile", str(hostfile),
                          "--launcher", "ssh", *chatter(tmp_path)], capture_output=True, text=True, timeout=120,
                         env=env(standin), cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    # Which host runs which rank is the rendezvous' choice: read it from the first line of each rank.
    first = {m["rank"]: m["host"] for m in map(WHOLE.match, reversed(out.stdout.splitlines())) if m}
    assert sorted(first.values()) == sorted(h.name for h in hosts)
    check_whole(out.stdout, out.stderr, hosts=first)
