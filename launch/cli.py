"""``distcomp launch``: its options, and the choice of launcher mode from them and the environment.

distcomp launch --nproc-per-node 2 train.py --lr 0.1                  # one node: torchrun here
distcomp launch --hostfile hosts -- distcomp train configs/quickstart.yaml   # one agent per host over ssh/pdsh
distcomp launch --launcher mpich --hostfile hosts train.py            # mpiexec starts the ranks
srun --nodes=$SLURM_NNODES --ntasks=$SLURM_NNODES distcomp launch train.py   # SLURM: one agent per node
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from distcomp.launch import mpi, preflight, runners, slurm
from distcomp.launch.environment import default_env_file, job_env
from distcomp.launch.errors import EXIT_PREFLIGHT, EXIT_USAGE, LaunchConfigError, LaunchError
from distcomp.launch.hostfile import MAX_SLOTS, Host, host_name_problem, parse_hostfile, select_hosts
from distcomp.launch.spec import Command, Job, Program
from distcomp.launch.supervise import run_nodes
from distcomp.launch.torchrun import agent_argv, agent_env

from distcomp.console import console_logging

logger = logging.getLogger("distcomp.launch")
LAUNCHERS = ("auto", "local", "ssh", "pdsh", "mpich", "openmpi", "slurm")
DRY_RUN_PORT = 29500
"""The port ``--dry-run`` shows for a remote job when none is given (it contacts no host to find a free one)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``distcomp launch`` (also ``python -m distcomp.launch``)."""
    where = parser.add_argument_group("where ranks run")
    where.add_argument(
        "--nproc-per-node",
        type=int,
        metavar="N",
        help="ranks per node (default: the hostfile's "
        "slots; 1 on a single node; under SLURM its GPUs or --ntasks-per-node)",
    )
    where.add_argument("--hostfile", metavar="PATH", help="'HOST slots=N [addr=IP] [ifname=IFACE]' lines")
    where.add_argument("--include", default="", metavar="SEL", help="only these hosts/slots, e.g. 'a:0,2@b'")
    where.add_argument("--exclude", default="", metavar="SEL", help="all but these hosts/slots, e.g. 'c@a:1'")
    where.add_argument("--num-nodes", type=int, metavar="N", help="the first N hosts of the selection")
    where.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="auto",
        help="how ranks start (auto: srun step -> slurm, hostfile -> pdsh when installed else ssh, otherwise local)",
    )
    net = parser.add_argument_group("rendezvous")
    net.add_argument("--master-addr", metavar="ADDR", help="rendezvous address (default: the first host's addr)")
    net.add_argument("--master-port", type=int, metavar="PORT", help="rendezvous port (default: a free one)")
    net.add_argument("--rdzv-id", metavar="ID", help="job id shared by the agents (default: random)")
    net.add_argument("--nnodes", metavar="MIN:MAX", help="elastic range of nodes for torch's agent")
    net.add_argument("--max-restarts", type=int, default=0, metavar="N", help="restarts of the worker group")
    env = parser.add_argument_group("environment")
    env.add_argument("--env", action="append", default=[], metavar="KEY=VAL", help="a variable for every rank")
    env.add_argument("--env-file", metavar="PATH", help="KEY=VAL lines (default: .distcomp_env here or in ~)")
    env.add_argument("--python", default=sys.executable, help="Python on every host (default: this one)")
    env.add_argument("--ssh-port", type=int, metavar="PORT", help="ssh port of every host")
    env.add_argument("--ssh-option", action="append", default=[], metavar="OPT", help="an ssh -o option")
    run = parser.add_argument_group("the program")
    run.add_argument("-m", "--module", action="store_true", help="SCRIPT is a Python module (python -m)")
    run.add_argument("--no-python", action="store_true", help="SCRIPT is an executable, not Python")
    run.add_argument(
        "--stop-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds the other nodes get to stop after one fails, before they are killed",
    )
    run.add_argument("--dry-run", action="store_true", help="print the command of every host and exit")
    run.add_argument(
        "program",
        nargs=argparse.REMAINDER,
        metavar="SCRIPT [ARGS]",
        help="what every rank runs; 'distcomp train CONFIG' runs the main job",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``distcomp launch`` with parsed options; the exit code."""
    # Its own tag, and no propagation: where "distcomp" logs to the console too, each line would print twice.
    console_logging("distcomp.launch", "distcomp launch", propagate=False)
    try:
        return _run(args, os.environ)
    except LaunchConfigError as exc:
        sys.stderr.write(f"distcomp launch: error: {exc}\n")
        return EXIT_USAGE
    except LaunchError as exc:
        sys.stderr.write(f"distcomp launch: error: {exc}\n")
        return EXIT_PREFLIGHT


def _program_words(args: argparse.Namespace) -> list[str]:
    words = list(args.program)
    return words[1:] if words[:1] == ["--"] else words


def check_options(args: argparse.Namespace) -> None:
    """Options that can be wrong on their own, checked before anything starts (also under ``--dry-run``)."""
    for name, value in vars(args).items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and "\0" in text:
                raise LaunchConfigError(
                    f"--{name.replace('_', '-')} {text!r}: contains a NUL byte (no process can be given it)"
                )
    for flag, port in (("--master-port", args.master_port), ("--ssh-port", args.ssh_port)):
        if port is not None and not 1 <= port <= 65535:
            raise LaunchConfigError(f"{flag} {port}: a TCP port is 1 to 65535")
    if args.nproc_per_node is not None and not 1 <= args.nproc_per_node <= MAX_SLOTS:
        raise LaunchConfigError(
            f"--nproc-per-node {args.nproc_per_node}: must be 1 to {MAX_SLOTS} (ranks per node: one process each)"
        )
    if not math.isfinite(args.stop_timeout) or args.stop_timeout < 0:
        raise LaunchConfigError(
            f"--stop-timeout {args.stop_timeout}: must be a finite number of seconds >= 0 "
            "(the time nodes get to stop before they are killed)"
        )
    problem = host_name_problem(args.master_addr) if args.master_addr is not None else None
    if problem:
        raise LaunchConfigError(f"--master-addr {args.master_addr!r}: {problem}")


def _run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    check_options(args)
    program = Program.from_argv(args.program, module=args.module, no_python=args.no_python)
    mode = resolve_mode(args, environ)
    if mode == "slurm":
        return _run_slurm(args, program, environ)
    hosts = _hosts(args)
    job = _job(args, program, hosts, mode, environ)
    if mode in ("mpich", "openmpi"):
        return _run_mpi(args, job, mode)
    remote = _remote_argv(mode, args)
    if not args.dry_run:
        port = (
            preflight.local_port(args.master_port)
            if remote is None
            else preflight.probe_hosts(job, remote, args.master_port)
        )
        job = _with_port(job, port)
    commands = build_commands(job, mode, _ssh_options(args))
    if args.dry_run:
        return _print(commands, job, args, remote is not None)
    logger.info(
        "launching %d rank(s) on %d node(s) (%s): %s",
        job.world_size,
        len(job.hosts),
        mode,
        ", ".join(h.name for h in job.hosts),
    )
    return run_nodes(commands, prefix_output=remote is not None, stop_timeout_s=args.stop_timeout, elastic=job.elastic)


def resolve_mode(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    """The launcher mode: ``--launcher``, or for ``auto`` what the environment and options suggest."""
    if args.launcher != "auto":
        return args.launcher
    if "SLURM_STEP_ID" in environ and "SLURM_JOB_ID" in environ and not args.hostfile:
        return "slurm"
    if args.hostfile:
        return "pdsh" if shutil.which("pdsh") else "ssh"
    return "local"


def _hosts(args: argparse.Namespace) -> list[Host]:
    if args.hostfile:
        return select_hosts(
            parse_hostfile(args.hostfile),
            include=args.include,
            exclude=args.exclude,
            num_nodes=args.num_nodes,
            nproc_per_node=args.nproc_per_node,
        )
    if args.include or args.exclude or args.num_nodes:
        raise LaunchConfigError("--include/--exclude/--num-nodes select hosts of a --hostfile; none was given")
    if args.launcher in ("ssh", "pdsh"):
        raise LaunchConfigError(f"--launcher {args.launcher} needs a --hostfile")
    return [Host("localhost", args.nproc_per_node or 1, addr="127.0.0.1")]


def _job(args: argparse.Namespace, program: Program, hosts: list[Host], mode: str, environ: Mapping[str, str]) -> Job:
    env_file = Path(args.env_file) if args.env_file else default_env_file(Path.cwd())
    env = job_env(environ, env_file, args.env)
    if not args.hostfile and mode != "slurm":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # every rank is on this machine: talk over loopback
    _check_nnodes(args.nnodes, len(hosts))
    if args.max_restarts < 0:
        raise LaunchConfigError(f"--max-restarts {args.max_restarts}: must be >= 0")
    return Job(
        hosts=tuple(hosts),
        program=program,
        python=args.python,
        master_addr=args.master_addr or hosts[0].address,
        master_port=args.master_port or DRY_RUN_PORT,
        rdzv_id=args.rdzv_id or f"distcomp-{uuid.uuid4().hex[:12]}",
        cwd=str(Path.cwd()),
        env=tuple(env.items()),
        max_restarts=args.max_restarts,
        nnodes=args.nnodes,
        stop_timeout_s=args.stop_timeout,
    )


def _check_nnodes(nnodes: str | None, started: int) -> None:
    if nnodes is None:
        return
    low, _, high = nnodes.partition(":")
    if not low.isdigit() or not (high or low).isdigit() or int(low) > int(high or low) or int(low) < 1:
        raise LaunchConfigError(f"--nnodes {nnodes!r}: expected N or MIN:MAX with 1 <= MIN <= MAX")
    if not int(low) <= started <= int(high or low):
        raise LaunchConfigError(f"--nnodes {nnodes}: {started} node(s) are being started")


def _with_port(job: Job, port: int) -> Job:
    return replace(job, master_port=port)


def _ssh_options(args: argparse.Namespace) -> list[str]:
    opts = ["-p", str(args.ssh_port)] if args.ssh_port else []
    for opt in args.ssh_option:
        opts += ["-o", opt]
    return opts


def _remote_argv(mode: str, args: argparse.Namespace) -> preflight.RemoteArgv | None:
    if mode == "ssh":
        return lambda host, line: runners.ssh_argv(host, line, _ssh_options(args))
    if mode == "pdsh":
        return lambda host, line: ["pdsh", "-S", "-w", host, line]
    return None


def build_commands(job: Job, mode: str, ssh_options: Sequence[str] = ()) -> list[Command]:
    """The commands of a torchrun-based mode (``local``, ``ssh``, ``pdsh``), node ``i`` at index ``i``."""
    if mode == "local":
        if len(job.hosts) != 1:
            raise LaunchConfigError("--launcher local runs one node; use a hostfile with ssh or pdsh for more")
        return runners.local_commands(job)
    if mode == "ssh":
        return runners.ssh_commands(job, ssh_options)
    if mode == "pdsh":
        return runners.pdsh_commands(job)
    raise LaunchConfigError(f"--launcher {mode}: not a torchrun mode")


def _print(commands: Sequence[Command], job: Job, args: argparse.Namespace, remote: bool) -> int:
    if args.master_port is None:
        print(
            f"# master port {job.master_port}: not probed (--dry-run contacts no host); a free one is picked at launch"
        )
    for i, command in enumerate(commands):
        print(f"# node {i}: {command.label}")
        print(command.shell())
    return 0


# -- MPI ---------------------------------------------------------------------------------


def _run_mpi(args: argparse.Namespace, job: Job, flavor: str) -> int:
    multi_host = bool(args.hostfile)
    if not args.dry_run:
        mpi.check_mpi_executable(flavor)  # type: ignore[arg-type]
        if not multi_host:
            job = _with_port(job, preflight.local_port(args.master_port))
    command = mpi.mpi_command(job, flavor, multi_host=multi_host)  # type: ignore[arg-type]
    if args.dry_run:
        print(f"# all {job.world_size} ranks: {command.argv[0]}")
        print(command.shell())
        return 0
    logger.info("launching %d rank(s) with %s", job.world_size, command.argv[0])
    return run_nodes([command], prefix_output=False, stop_timeout_s=args.stop_timeout)


# -- SLURM -------------------------------------------------------------------------------


def node_options(args: argparse.Namespace) -> list[str]:
    """The options each SLURM node's launcher needs again (the rest are set by :func:`slurm.srun_command`)."""
    out: list[str] = []
    for flag, value in (
        ("--master-addr", args.master_addr),
        ("--rdzv-id", args.rdzv_id),
        ("--nnodes", args.nnodes),
        ("--env-file", args.env_file),
    ):
        if value is not None:
            out += [flag, value]
    if args.max_restarts:
        out += ["--max-restarts", str(args.max_restarts)]
    for assignment in args.env:
        out += ["--env", assignment]
    if args.python != sys.executable:
        out += ["--python", args.python]
    out += ["--module"] if args.module else []
    out += ["--no-python"] if args.no_python else []
    return out


def _run_slurm(args: argparse.Namespace, program: Program, environ: Mapping[str, str]) -> int:
    if args.hostfile:
        raise LaunchConfigError("--launcher slurm takes its nodes from the allocation; drop --hostfile")
    alloc = slurm.SlurmAllocation.from_env(environ, args.nproc_per_node)
    port = args.master_port or alloc.default_port()
    if not alloc.in_step:
        command = slurm.srun_command(alloc, args.python, [*node_options(args), "--", *_program_words(args)], port)
        if args.dry_run:
            print(f"# srun: one agent on each of {len(alloc.nodes)} node(s)")
            print(command.shell())
            return 0
        return run_nodes([command], prefix_output=False, stop_timeout_s=args.stop_timeout)
    args.master_port = port
    args.rdzv_id = args.rdzv_id or f"slurm-{alloc.job_id}"
    job = _job(args, program, alloc.hosts(), "slurm", environ)
    argv, env = slurm_node_command(job, alloc)
    if args.dry_run:
        node_id = _slurm_node_id(alloc)
        print(f"# node {node_id}: {alloc.nodes[node_id]}")
        print(Command(alloc.nodes[node_id], tuple(argv), tuple(env.items())).shell())
        return 0
    sys.stdout.flush()
    os.execvpe(argv[0], argv, {**os.environ, **env})  # srun supervises this node from here on
    return 0  # not reached


def slurm_node_command(job: Job, alloc: slurm.SlurmAllocation) -> tuple[list[str], dict[str, str]]:
    """``(argv, env)`` of this node's agent inside an srun step."""
    node_id = _slurm_node_id(alloc)
    return agent_argv(job, node_id), agent_env(job, node_id)


def _slurm_node_id(alloc: slurm.SlurmAllocation) -> int:
    """This node's index in ``alloc.nodes`` (``SLURM_NODEID``); an error outside an srun step or the node list."""
    if alloc.node_id is None or not 0 <= alloc.node_id < len(alloc.nodes):
        raise LaunchConfigError(f"SLURM_NODEID {alloc.node_id} is not a node of {', '.join(alloc.nodes)}")
    return alloc.node_id


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m distcomp.launch``: the same as ``distcomp launch``."""
    parser = argparse.ArgumentParser(prog="distcomp launch", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
