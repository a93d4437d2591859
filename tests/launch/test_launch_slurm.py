"""``distcomp launch`` under a live SLURM cluster: slurmctld and two slurmd, one per network namespace.

Real processes end to end, as on a cluster: SLURM allocates two nodes, starts
one task per node, and each task's ``distcomp launch`` maps the ``SLURM_*``
variables it was given to that node's torchrun agent (c10d rendezvous on the
first node of the node list, addressed by its node name). Both ways in that the
README documents are run: ``distcomp launch --launcher slurm`` from an
``sbatch`` script, and ``srun --nodes=$SLURM_NNODES --ntasks=$SLURM_NNODES
distcomp launch``. The cluster tests are skipped only where the SLURM binaries
are not installed or namespaces cannot be created (see :mod:`launch_slurm`).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from distcomp.launch.errors import LaunchConfigError
from distcomp.launch.slurm import SlurmAllocation
from launch_slurm import JobEnd, SlurmCluster, missing_reason, slurm_cluster
from test_train import QUICKSTART, sets
from test_train import TINY as TRAIN_TINY

pytestmark = pytest.mark.slow  # a live SLURM cluster in network namespaces

ROOT = Path(__file__).resolve().parents[2]
PROBE = str(Path(__file__).with_name("launch_train_probe.py"))
ALLREDUCE = str(Path(__file__).with_name("launch_allreduce.py"))
TINY = {**TRAIN_TINY, "dist.timeout_s": 20, "compare": "[]"}


# The SLURM_* variables of task 1 of a step in `sbatch --nodes 2 --ntasks-per-node 2`, as this cluster gave them
# (node names shortened), for the two srun lines a user is likely to write.
JOB = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_NNODES": "2", "SLURM_JOB_CPUS_PER_NODE": "2(x2)",
       "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "node[0-1]", "SLURM_NODEID": "1", "SLURMD_NODENAME": "node1"}
ONE_PER_NODE = {**JOB, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "1(x2)",
                "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}  # srun --nodes=$SLURM_NNODES --ntasks=$SLURM_NNODES
TWO_PER_NODE = {**JOB, "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2(x2)",
                "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}  # srun --ntasks-per-node=1: ignored, with a warning


def test_a_step_with_one_task_per_node_keeps_the_allocations_tasks_per_node_and_two_are_refused() -> None:
    assert SlurmAllocation.from_env(ONE_PER_NODE) == SlurmAllocation("7", ("node0", "node1"), 1, 2, True)
    with pytest.raises(LaunchConfigError, match=r"srun started 2 tasks on node node1 \(SLURM_STEP_TASKS_PER_NODE"):
        SlurmAllocation.from_env(TWO_PER_NODE)
    assert SlurmAllocation.from_env({k: v for k, v in TWO_PER_NODE.items() if "STEP" not in k}).node_id is None


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    reason = missing_reason()
    if reason is not None:
        pytest.skip(f"no live SLURM cluster: {reason}")
    with slurm_cluster() as running:
        yield running


def job_env(cluster: SlurmCluster) -> dict[str, str]:
    """The submitting shell's environment; no socket interface, so ranks find theirs from the node name."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLOO_", "NCCL_", "SLURM_"))}
    return cluster.env({**env, "OMP_NUM_THREADS": "1"})


def run_client(cluster: SlurmCluster, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cluster.client(argv), capture_output=True, text=True, timeout=timeout,
                          env=job_env(cluster), cwd=ROOT)


def params(folder: Path, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(folder / f"params-rank{rank}.pt", weights_only=True)


def batch_script(path: Path, *lines: str) -> Path:
    path.write_text("#!/bin/sh\nset -e\n" + "\n".join(lines) + "\n")
    return path


def sbatch(cluster: SlurmCluster, tmp: Path, script: Path, per_node: int, timeout: float) -> tuple[JobEnd, str]:
    """Run ``script`` on both nodes with ``per_node`` tasks a node; how it ended and its output."""
    log = tmp / f"{script.stem}.out"
    end = cluster.submit(["--nodes", "2", "--ntasks-per-node", str(per_node), "--time", "3", "--output", str(log),
                          "--chdir", str(ROOT), str(script)], job_env(cluster), ROOT, timeout=timeout)
    return end, log.read_text() if log.exists() else "(no job output)"


def allreduce_reports(folder: Path, world: int) -> list[dict]:
    reports = [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]
    assert [r["RANK"] for r in reports] == [str(r) for r in range(world)], sorted(folder.iterdir())
    return reports


def test_sbatch_script_with_launcher_slurm_trains_on_both_nodes_to_identical_parameters(
        tmp_path: Path, cluster: SlurmCluster) -> None:
    probe = tmp_path / "probe"
    launch = [sys.executable, "-m", "distcomp", "launch", "--launcher", "slurm", "--stop-timeout", "15", "--",
              PROBE, str(probe), "train", QUICKSTART, "--quiet",
              *sets({**TINY, "steps": 6, "name": "slurm", "log.dir": tmp_path / "runs"})]
    end, job_log = sbatch(cluster, tmp_path, batch_script(tmp_path / "train.sh", shlex.join(launch)), per_node=1,
                          timeout=150)
    assert (end.state, end.exit_code) == ("COMPLETED", 0), f"{end}\n{job_log[-4000:]}\n{cluster.logs()}"
    assert "distcomp train slurm: 2 ranks (gloo, cpu)" in job_log, job_log[-4000:]
    node0, node1 = cluster.node_names
    probes = [json.loads(p.read_text()) for p in sorted(probe.glob("pid-*.json"))]
    assert sorted((p["host"], p["node"]) for p in probes) == [(node0, "0"), (node1, "1")]
    a, b = params(probe, 0), params(probe, 1)
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(json.loads((tmp_path / "runs" / "slurm" / "summary.json").read_text())["runs"][0]["losses"]) == 6


def test_both_ways_in_start_the_allocations_tasks_per_node_as_ranks(tmp_path: Path, cluster: SlurmCluster) -> None:
    launch = f"{sys.executable} -m distcomp launch"
    script = batch_script(tmp_path / "two_ways.sh",
                          f"srun --nodes=$SLURM_NNODES --ntasks=$SLURM_NNODES {launch} {ALLREDUCE} {tmp_path / 'srun'}",
                          f"{launch} --launcher slurm {ALLREDUCE} {tmp_path / 'launcher'}")
    end, job_log = sbatch(cluster, tmp_path, script, per_node=2, timeout=120)
    assert (end.state, end.exit_code) == ("COMPLETED", 0), f"{end}\n{job_log[-4000:]}\n{cluster.logs()}"
    for way in ("srun", "launcher"):
        reports = allreduce_reports(tmp_path / way, world=4)
        assert [r["sum"] for r in reports] == [10.0] * 4, way
        assert {r["LOCAL_WORLD_SIZE"] for r in reports} == {"2"}, way
        assert {r["MASTER_ADDR"] for r in reports} == {cluster.node_names[0]}, way


def test_srun_with_several_tasks_per_node_is_refused_with_the_command_to_use(
        tmp_path: Path, cluster: SlurmCluster) -> None:
    # In an allocation made with --ntasks-per-node 2, srun keeps its 4 tasks and ignores --ntasks-per-node=1.
    script = batch_script(tmp_path / "two_per_node.sh",
                          f"srun --ntasks-per-node=1 {sys.executable} -m distcomp launch {ALLREDUCE} {tmp_path}")
    end, job_log = sbatch(cluster, tmp_path, script, per_node=2, timeout=60)
    assert end.state == "FAILED" and end.exit_code != 0, f"{end}\n{job_log[-4000:]}"
    assert f"srun started 2 tasks on node {cluster.node_names[0]}" in job_log, job_log[-4000:]
    assert "srun --nodes=$SLURM_NNODES --ntasks=$SLURM_NNODES distcomp launch" in job_log
    assert "Traceback" not in job_log and not list(tmp_path.glob("rank*.json"))


def test_srun_outside_an_allocation_runs_one_launcher_per_node(tmp_path: Path, cluster: SlurmCluster) -> None:
    out = run_client(cluster, ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--time", "2",
                               sys.executable, "-m", "distcomp", "launch", ALLREDUCE, str(tmp_path)], timeout=100)
    assert out.returncode == 0, f"{out.stdout}{out.stderr[-4000:]}\n{cluster.logs()}"
    reports = allreduce_reports(tmp_path, world=2)
    assert [r["sum"] for r in reports] == [3.0, 3.0]
    assert [r["LOCAL_WORLD_SIZE"] for r in reports] == ["1", "1"]


FAIL_ON_NODE_1 = """\
import datetime, os, sys
import torch.distributed as dist
if os.environ["DISTCOMP_LAUNCH_NODE"] == "1":
    sys.exit(7)
# Rank 1 never joins: only SLURM ending the step (srun --kill-on-bad-exit) ends this rank early.
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
"""


def test_a_failing_node_ends_the_whole_job_long_before_the_collective_timeout(
        tmp_path: Path, cluster: SlurmCluster) -> None:
    program = tmp_path / "fail.py"
    program.write_text(FAIL_ON_NODE_1)
    script = batch_script(tmp_path / "fail.sh", f"{sys.executable} -m distcomp launch --launcher slurm {program}")
    started = time.monotonic()
    end, job_log = sbatch(cluster, tmp_path, script, per_node=1, timeout=100)
    assert end.state == "FAILED" and end.exit_code != 0, f"{end}\n{job_log[-4000:]}"
    assert time.monotonic() - started < 60, job_log[-4000:]  # the rank waiting for node 1 would wait 300 s
    node0, node1 = cluster.node_names
    assert f"srun: error: {node1}: task 1: Exited with exit code 1" in job_log, job_log[-4000:]
    assert f"STEP {end.job_id}.0 ON {node0} CANCELLED" in job_log, job_log[-4000:]
