"""The torch elastic agent (``python -m torch.distributed.run``) each node runs, and its environment.

Multi-node jobs use the c10d rendezvous: node 0 hosts the TCP store on the
master address (``is_host=true``; the others ``is_host=false``, so nothing
depends on torch guessing which addresses are its own), and every node
advertises ``--local-addr``, the address the others reach it at.
"""

from __future__ import annotations

from distcomp.launch.environment import socket_env
from distcomp.launch.spec import Job

AGENT_MODULE = "torch.distributed.run"


def agent_argv(job: Job, index: int) -> list[str]:
    """The exact torchrun command line of node ``index``."""
    host = job.hosts[index]
    multi = len(job.hosts) > 1 or job.elastic
    argv = [job.python, "-m", AGENT_MODULE,
            "--nnodes", job.nnodes or str(len(job.hosts)),
            "--nproc-per-node", str(host.slots),
            "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{job.master_addr}:{job.master_port}",
            "--rdzv-id", job.rdzv_id,
            "--rdzv-conf", f"is_host={'true' if index == 0 else 'false'}"]
    if multi:
        argv += ["--local-addr", host.address]
    argv += ["--max-restarts", str(job.max_restarts)]
    return argv + job.program.torchrun_args()


def agent_env(job: Job, index: int) -> dict[str, str]:
    """The variables node ``index``'s agent starts with (its workers inherit them)."""
    host = job.hosts[index]
    env = dict(job.env)
    if host.ifname:
        env.update(socket_env(host.ifname))
    if job.max_restarts > 0 or job.elastic:
        # torch >= 2.4 hands the workers the agents' rendezvous store and keeps it across restarts without a
        # per-attempt prefix: restarted workers can read the previous attempt's keys (gloo then dials a dead
        # peer: "Connection refused"). A fresh store per attempt, hosted by the new rank 0, avoids that.
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if host.devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in host.devices)
    # Tells a rank which host of the launch it is on (logs, tests); torch's GROUP_RANK is the rendezvous order.
    env["DISTCOMP_LAUNCH_NODE"] = str(index)
    env["DISTCOMP_LAUNCH_HOST"] = host.name
    return env
