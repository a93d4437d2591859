"""The torch elastic agent each node runs (torchrun, through :mod:`distcomp.launch.agent`), and its environment.

Jobs use the c10d rendezvous: node 0 hosts the TCP store on the master address
(``is_host=true``; the others ``is_host=false``, so nothing depends on torch
guessing which addresses are its own), and every node advertises
``--local-addr``, the address the others reach it at (127.0.0.1 on a single
node). :mod:`distcomp.launch.agent` binds the stores to those addresses.

Where several ranks share the output, the agent tees every worker's stdout and
stderr (``--tee 3``) and writes them in whole lines with a ``[rank R]`` prefix
(:data:`LINE_PREFIX`); ``PYTHONUNBUFFERED=1`` keeps workers from holding lines back.
"""

from __future__ import annotations

from distcomp.launch.environment import socket_env
from distcomp.launch.spec import Job

AGENT_MODULE = "distcomp.launch.agent"
LINE_PREFIX = "[rank ${rank}] "
"""torch's ``TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE``: each worker line starts with its global rank."""


def _shared_output(job: Job) -> bool:
    return job.world_size > 1 or job.elastic


def agent_argv(job: Job, index: int) -> list[str]:
    """The exact torchrun command line of node ``index``."""
    host = job.hosts[index]
    argv = [
        job.python,
        "-m",
        AGENT_MODULE,
        "--nnodes",
        job.nnodes or str(len(job.hosts)),
        "--nproc-per-node",
        str(host.slots),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"{job.master_addr}:{job.master_port}",
        "--rdzv-id",
        job.rdzv_id,
        "--rdzv-conf",
        f"is_host={'true' if index == 0 else 'false'}",
    ]
    argv += ["--local-addr", host.address, "--max-restarts", str(job.max_restarts)]
    if _shared_output(job):
        argv += ["--tee", "3"]
    return argv + job.program.torchrun_args()


def agent_env(job: Job, index: int) -> dict[str, str]:
    """The variables node ``index``'s agent starts with (its workers inherit them)."""
    host = job.hosts[index]
    env = dict(job.env)
    if host.ifname:
        env.update(socket_env(host.ifname))
    if host.devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in host.devices)
    # Tells a rank which host of the launch it is on (logs, tests); torch's GROUP_RANK is the rendezvous order.
    env["DISTCOMP_LAUNCH_NODE"] = str(index)
    env["DISTCOMP_LAUNCH_HOST"] = host.name
    if _shared_output(job):
        env["TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"] = LINE_PREFIX
        env.setdefault("PYTHONUNBUFFERED", "1")
    return env
