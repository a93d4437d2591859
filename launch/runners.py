"""Commands that start one torchrun agent per host: locally, over ssh, or over pdsh.

Every agent runs under :mod:`distcomp.launch.watchdog`, on its own host: it
stops the agent and its workers when the launcher dies (its stdin, a pipe the
launcher holds, reaches EOF; over ssh the connection carries that EOF) or when
its output hangs up. pdsh does not forward stdin, so there the watchdog relies
on the hang-up alone.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from distcomp.launch.spec import Command, Job
from distcomp.launch.torchrun import agent_argv, agent_env
from distcomp.launch.watchdog import watchdog_argv

SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=10")
"""Never prompt for a password (a prompt would hang the launch) and give up on a dead host quickly."""


def node_argv(job: Job, index: int, watch_stdin: bool = True) -> list[str]:
    """Node ``index``'s agent under the watchdog (grace period: the job's stop timeout)."""
    return watchdog_argv(job.python, agent_argv(job, index), job.stop_timeout_s, watch_stdin)


def local_commands(job: Job) -> list[Command]:
    """The single-node job: torchrun on this machine."""
    return [Command(job.hosts[0].name, tuple(node_argv(job, 0)), tuple(agent_env(job, 0).items()), lifeline=True)]


def remote_shell(job: Job, index: int, watch_stdin: bool = True) -> str:
    """The shell line a remote host runs.

    Same directory, the job's variables, then the watchdog in place of the shell.
    """
    env = [f"{k}={v}" for k, v in agent_env(job, index).items()]
    argv = ["env", *env, *node_argv(job, index, watch_stdin)]
    return f"cd {shlex.quote(job.cwd)} && exec {shlex.join(argv)}"


def ssh_argv(host: str, remote: str, ssh_options: Sequence[str] = ()) -> list[str]:
    """``ssh`` running shell line ``remote`` on ``host``."""
    return ["ssh", *SSH_OPTIONS, *ssh_options, host, remote]


def ssh_commands(job: Job, ssh_options: Sequence[str] = ()) -> list[Command]:
    """One ``ssh HOST 'cd CWD && exec env ... torchrun ...'`` per host."""
    return [
        Command(h.name, tuple(ssh_argv(h.name, remote_shell(job, i), ssh_options)), lifeline=True)
        for i, h in enumerate(job.hosts)
    ]


def pdsh_commands(job: Job) -> list[Command]:
    """One ``pdsh -S -w HOST ...`` per host: each host's agent line differs (``is_host``, ``--local-addr``).

    ``-S`` makes pdsh exit with the remote command's status, so a failed node is
    reported like with ssh. pdsh reaches hosts with ssh unless ``PDSH_RCMD_TYPE`` says otherwise.
    """
    return [
        Command(
            h.name, ("pdsh", "-S", "-w", h.name, remote_shell(job, i, watch_stdin=False)), (("PDSH_RCMD_TYPE", "ssh"),)
        )
        for i, h in enumerate(job.hosts)
    ]
