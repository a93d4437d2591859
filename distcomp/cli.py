"""The ``distcomp`` command.

    distcomp train configs/quickstart.yaml [--set KEY=VALUE ...] [--resume PATH | --overwrite] [--device cpu] [--quiet]
    distcomp launch [--hostfile H | --nproc-per-node N | --launcher mpich|openmpi|slurm] [--dry-run] SCRIPT [ARGS...]
    distcomp bench [--quick] | distcomp bench predict [--bandwidth 1gbit] [--world 8,64]
    distcomp info

Configuration errors stop the command before any rank starts, with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Sequence

from distcomp.console import console_logging
from distcomp.errors import CheckpointError, ConfigError
from distcomp.launch import cli as launch_cli

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per job."""
    parser = argparse.ArgumentParser(prog="distcomp", description="Compressed data-parallel training for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train a byte-level GPT with compression and print what it bought",
        description="Train on local ranks (or join torchrun's job) and print a summary table.",
    )
    train.add_argument("config", help="a YAML train config, e.g. configs/quickstart.yaml")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable): --set compression.rank=8 --set steps=200. "
        "Setting compression.compressor drops the file's options for the old compressor.",
    )
    start = train.add_mutually_exclusive_group()
    start.add_argument(
        "--resume",
        metavar="PATH",
        help="continue from a checkpoint directory (or the newest one in a checkpoints folder); "
        "'auto': from this run's newest checkpoint if it has one, else from the start "
        "(what a restarted job wants: distcomp launch --max-restarts); a folder or 'auto' "
        "skips damaged checkpoints with a warning",
    )
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="start over even though the run's folder holds an earlier run's checkpoints: its files "
        "are moved to <log.dir>/<name>/previous/<time>/, nothing is deleted",
    )
    train.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        help="where ranks run (default: the config's dist.device, auto = CUDA when available)",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar; log lines every log.every steps")
    train.set_defaults(func=_train)

    launch = sub.add_parser(
        "launch",
        help="start a script (or distcomp train) on many nodes: torchrun, hostfile over ssh/pdsh, mpirun, SLURM",
        description="Start one torch elastic agent per node (or MPI ranks) running SCRIPT. "
        "Example: distcomp launch --hostfile hosts -- distcomp train CONFIG",
    )
    launch_cli.add_arguments(launch)
    launch.set_defaults(func=launch_cli.run)

    info = sub.add_parser("info", help="what this machine offers: torch, backends, GPUs, Triton, MPI, kernels")
    info.set_defaults(func=_info)

    bench = sub.add_parser(
        "bench",
        help="scaling benchmark: hosts as network namespaces at 10 Mbit/s to unshaped; 'bench predict' for others",
        description="Step time, bytes, tokens/s and time-to-loss of every method on 2 and 4 hosts at several "
        "link rates (needs root); 'distcomp bench predict' predicts them for a network you do not have.",
    )
    from distcomp.bench.cli import add_arguments as add_bench

    add_bench(bench)
    check = sub.add_parser(
        "check",
        help="prove the GPU path: kernels against their references, hooks, optimizers and FSDP on CUDA/NCCL",
        description="distcomp check gpu: a pass/fail table and a JSON report (docs/gpu.md).",
    )
    from distcomp.check import add_arguments

    add_arguments(check)
    check.set_defaults(func=_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``distcomp`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)


def _train(args: argparse.Namespace) -> int:
    from distcomp.train.config import load_train_config
    from distcomp.train.launch import launch
    from distcomp.train.rundir import JobScope

    console_logging()
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"dist.device={args.device}")
    if args.quiet:
        overrides.append("log.progress=false")
    try:
        cfg = load_train_config(args.config, overrides)
        with JobScope(overwrite=args.overwrite):  # the run directory's lock is held until the job ends
            return launch(cfg, args.resume)
    except (ConfigError, CheckpointError) as exc:
        sys.stderr.write(f"distcomp train: error: {exc}\n")
        return EXIT_USAGE


def _check(args: argparse.Namespace) -> int:
    from distcomp.check import check

    return check(args)


# -- info --------------------------------------------------------------------------------


def machine_info() -> list[tuple[str, str]]:
    """``(label, value)`` lines describing this machine as distcomp sees it."""
    import torch
    import torch.distributed as dist

    import distcomp

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    avail = lambda ok: "yes" if ok else "no"  # noqa: E731
    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    lines = [
        ("distcomp", distcomp.__version__),
        ("python", f"{platform.python_version()} ({platform.system()} {platform.machine()}, {cores} CPU cores)"),
        ("torch", torch.__version__),
        ("gloo", avail(dist.is_available() and dist.is_gloo_available())),
        ("nccl", avail(dist.is_available() and dist.is_nccl_available())),
        ("mpi backend", avail(dist.is_available() and dist.is_mpi_available())),
        ("cuda", f"{len(gpus)} device(s): {', '.join(gpus)} (CUDA {torch.version.cuda})" if cuda else "not available"),
        ("triton", _version("triton")),
        ("mpi4py", _version("mpi4py")),
        ("kernels", _kernels_line(cuda)),
        ("compressors", ", ".join(distcomp.available_compressors())),
        ("distcomp train", "NCCL, one GPU per rank" if cuda else "gloo on CPU"),
    ]
    return lines


def _version(package: str) -> str:
    if importlib.util.find_spec(package) is None:
        return "not installed"
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "installed (version unknown)"


def _kernels_line(cuda: bool) -> str:
    from distcomp.kernels import kernel_info

    info = kernel_info()
    paths = [f"cpu: {info['cpu']}"] + ([f"cuda: {info['cuda']}"] if "cuda" in info else [])
    return f"{'; '.join(paths)}; ops: {info['ops']}"


def _info(args: argparse.Namespace) -> int:
    lines = machine_info()
    width = max(len(label) for label, _ in lines)
    for label, value in lines:
        print(f"{label.ljust(width)}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
