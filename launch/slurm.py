"""SLURM: map an allocation's ``SLURM_*`` variables to one torchrun agent per node.

Two ways in, both inside an allocation (``sbatch``/``salloc``):

* ``srun --nodes=$SLURM_NNODES --ntasks=$SLURM_NNODES distcomp launch ...``: one
  task per node, which reads its node id and the node list and runs that node's
  agent (``cli.slurm_node_command``). A step with several tasks on a node is
  refused: they would all start that node's agent. ``srun --ntasks-per-node=1``
  alone does not give one task per node in an allocation made with
  ``--ntasks-per-node=K``: srun keeps the allocation's task count and ignores it.
* ``distcomp launch --launcher slurm ...`` from the batch script: the launcher
  runs ``srun`` with one task per node, each of which does the above
  (:func:`srun_command`).

Node 0 of the node list is the rendezvous host. Ranks per node: ``--nproc-per-node``,
else the GPUs SLURM gave the node, else ``SLURM_NTASKS_PER_NODE`` (the allocation's
``--ntasks-per-node``, unless srun itself was given one), else 1.
The port, unless given, is derived from the job id so that every node picks the
same one without talking to the others.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from distcomp.launch.errors import LaunchConfigError
from distcomp.launch.hostfile import Host
from distcomp.launch.spec import Command

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_nodelist(text: str) -> list[str]:
    """``"gpu[01-03,07],login1"`` into ``["gpu01", "gpu02", "gpu03", "gpu07", "login1"]`` (SLURM's hostlist syntax)."""
    names: list[str] = []
    for part in _split_top_level(text):
        names += _expand_one(part, text)
    return names


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_one(part: str, whole: str) -> list[str]:
    match = re.match(r"^([^\[]*)\[([^\]]+)\](.*)$", part)
    if match is None:
        return [part]
    prefix, ranges, rest = match.groups()
    out = []
    for item in ranges.split(","):
        bounds = _RANGE.match(item.strip())
        if bounds is None:
            raise LaunchConfigError(f"SLURM node list {whole!r}: cannot read range {item!r}")
        low, high = bounds.group(1), bounds.group(2) or bounds.group(1)
        for n in range(int(low), int(high) + 1):
            for tail in _expand_one(rest, whole) if rest else [""]:
                out.append(f"{prefix}{n:0{len(low)}d}{tail}")
    return out


def expand_counts(text: str) -> list[int]:
    """``"2(x3),1"`` into ``[2, 2, 2, 1]`` (SLURM's per-node count syntax)."""
    out: list[int] = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if match is None:
            raise LaunchConfigError(f"SLURM count list {text!r}: cannot read {item!r}")
        out += [int(match.group(1))] * int(match.group(2) or 1)
    return out


@dataclass(frozen=True)
class SlurmAllocation:
    """What the ``SLURM_*`` variables say about this allocation and this task."""

    job_id: str
    nodes: tuple[str, ...]
    node_id: int | None
    """This task's node (``SLURM_NODEID``); ``None`` outside a job step."""
    procs_per_node: int
    in_step: bool
    """True inside an ``srun`` step (``SLURM_STEP_ID`` set), False in the batch script itself."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str], nproc_per_node: int | None = None) -> SlurmAllocation:
        """Read the allocation; :class:`LaunchConfigError` outside one."""
        if "SLURM_JOB_ID" not in environ and "SLURM_JOBID" not in environ:
            raise LaunchConfigError("--launcher slurm: no SLURM_JOB_ID here; run inside an allocation (sbatch/salloc)")
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        if not nodelist:
            raise LaunchConfigError("--launcher slurm: SLURM_JOB_NODELIST is not set")
        in_step = "SLURM_STEP_ID" in environ
        node_id = int(environ["SLURM_NODEID"]) if in_step and "SLURM_NODEID" in environ else None
        if node_id is not None:
            _check_one_task_on_node(environ, node_id)
        return cls(
            environ.get("SLURM_JOB_ID") or environ["SLURM_JOBID"],
            tuple(expand_nodelist(nodelist)),
            node_id,
            nproc_per_node or _procs_per_node(environ),
            in_step,
        )

    def default_port(self) -> int:
        """A port every node derives alike from the job id (in 20000-39999)."""
        digits = re.sub(r"\D", "", self.job_id) or "0"
        return 20000 + int(digits) % 20000

    def hosts(self) -> list[Host]:
        """One host per node of the allocation, in node-list order."""
        return [Host(name, self.procs_per_node) for name in self.nodes]


def _check_one_task_on_node(environ: Mapping[str, str], node_id: int) -> None:
    """Refuse a step with several tasks on this node: each would start the node's agent, and the duplicates
    collide on the rendezvous port or join as extra nodes."""
    name = next((k for k in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if environ.get(k)), None)
    if name is None:
        return
    counts = expand_counts(environ[name])
    tasks = counts[node_id] if node_id < len(counts) else 1
    if tasks > 1:
        raise LaunchConfigError(
            f"srun started {tasks} tasks on node {environ.get('SLURMD_NODENAME', node_id)} ({name}={environ[name]}); "
            "distcomp launch runs once per node and starts that node's ranks itself: "
            "srun --nodes=$SLURM_NNODES --ntasks=$SLURM_NNODES distcomp launch ..., or "
            "distcomp launch --launcher slurm ... from the batch script"
        )


def _procs_per_node(environ: Mapping[str, str]) -> int:
    gpus = environ.get("SLURM_GPUS_ON_NODE", "")
    if gpus.isdigit() and int(gpus) > 0:
        return int(gpus)
    per_node = environ.get("SLURM_NTASKS_PER_NODE", "")
    if per_node:
        return expand_counts(per_node)[0]
    return 1


def srun_command(alloc: SlurmAllocation, python: str, launch_args: Sequence[str], master_port: int) -> Command:
    """``srun`` with one task per node, each running this launch again as that node's agent."""
    n = str(len(alloc.nodes))
    argv = [
        "srun",
        "--nodes",
        n,
        "--ntasks",
        n,
        "--ntasks-per-node",
        "1",
        "--kill-on-bad-exit=1",
        python,
        "-m",
        "distcomp.launch",
        "--launcher",
        "slurm",
        "--nproc-per-node",
        str(alloc.procs_per_node),
        "--master-port",
        str(master_port),
        *launch_args,
    ]
    return Command("srun", tuple(argv))
