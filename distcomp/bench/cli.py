"""``distcomp bench``: the scaling benchmark across hosts and links, and ``distcomp bench predict``.

    distcomp bench --quick                      # 2 hosts; unshaped, 1gbit, 100mbit; 8 methods (< 10 min)
    distcomp bench                              # 2 and 4 hosts; unshaped, 1gbit, 100mbit, 10mbit; every method
    distcomp bench predict --bandwidth 1gbit    # the 10.9M GPT from 8 to 1024 ranks
    distcomp bench predict --params 125e6 --compute-ms 350 --device cuda --bandwidth 10gbit

A run writes ``<out>/<date>-<name>/``: ``README.md`` (every table), ``results.json``, the PNG plots, and one
folder per cell with its hostfile, job, launcher log and each rank's records. It never overwrites an
earlier run: a taken name gets ``-2``, ``-3``...
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
from pathlib import Path

from distcomp.bench import methods as methods_mod
from distcomp.bench import netns

logger = logging.getLogger("distcomp.bench")

EXIT_USAGE = 2
QUICK = {"hosts": "2", "bandwidth": "none,1gbit,100mbit", "steps": "4", "loss_steps": "12"}
FULL = {"hosts": "2,4", "bandwidth": "none,1gbit,100mbit,10mbit", "steps": "6", "loss_steps": "20"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``distcomp bench`` and its ``predict`` sub-command."""
    parser.add_argument("--quick", action="store_true", help="2 hosts, 3 links, 8 methods, short curves (< 10 min)")
    parser.add_argument("--hosts", help=f"comma-separated host counts (default {FULL['hosts']}; quick 2)")
    parser.add_argument(
        "--bandwidth", help=f"comma-separated tc rates, 'none' = unshaped (default {FULL['bandwidth']})"
    )
    parser.add_argument(
        "--methods", help="comma-separated methods (default: all; quick: " + ",".join(methods_mod.QUICK_METHODS) + ")"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a 0.1M-parameter model: checks the setup in seconds (figures mean little)"
    )
    parser.add_argument("--dense", action="store_true", help="keep dense methods on links below 50 Mbit/s")
    parser.add_argument("--steps", type=int, help="timed steps per method and cell (default 6; quick 4)")
    parser.add_argument(
        "--loss-steps", type=int, help="N of time-to-loss: DDP's loss at step N is the target (default 20; quick 12)"
    )
    parser.add_argument("--name", help="results folder name (default: bench, or bench-quick)")
    parser.add_argument("--out", default=None, help="parent folder of the results (default: benchmarks/results)")
    parser.add_argument("--report", metavar="FOLDER", help="write a run's tables and plots again from its results.json")
    parser.add_argument(
        "--set-reference", action="store_true", help="with --report: ship that run's figures with the package"
    )
    parser.set_defaults(func=run)
    sub = parser.add_subparsers(dest="bench_command", metavar="predict")
    predict = sub.add_parser("predict", help="predict each method's step time and speedup on a network")
    from distcomp.bench.predict_cli import add_arguments as add_predict

    add_predict(predict)


def _plan(args: argparse.Namespace) -> tuple[list[int], list[str | None], list[methods_mod.Method], int, int]:
    base = QUICK if args.quick else FULL
    hosts = [int(h) for h in (args.hosts or base["hosts"]).split(",")]
    links = netns.parse_links(args.bandwidth or base["bandwidth"])
    for link in links:
        if link is not None:
            netns.rate_bits(link)
    warmup = 3
    names = args.methods.split(",") if args.methods else (list(methods_mod.QUICK_METHODS) if args.quick else None)
    chosen = methods_mod.select(names, warmup)
    for must in ("ddp", "noop"):
        if must not in {m.name for m in chosen}:
            raise ValueError(f"--methods must include {must}: every ratio and the time-to-loss target need it")
    steps = args.steps or int(base["steps"])
    loss_steps = args.loss_steps or int(base["loss_steps"])
    if steps < 2 or loss_steps < 2:
        raise ValueError("--steps and --loss-steps must be at least 2")
    return hosts, links, chosen, steps, loss_steps


def _results_folder(args: argparse.Namespace) -> Path:
    from distcomp.bench.results import free_folder, results_root

    name = args.name or ("bench-quick" if args.quick else "bench")
    return free_folder(Path(args.out) if args.out else results_root(), f"{datetime.date.today():%Y-%m-%d}-{name}")


def run(args: argparse.Namespace) -> int:
    """``distcomp bench``: the exit code."""
    if getattr(args, "bench_command", None) == "predict":
        from distcomp.bench.predict_cli import run as run_predict

        return run_predict(args)
    if args.report:
        from distcomp.bench.results import rewrite, set_reference

        rewrite(Path(args.report))
        if args.set_reference:
            set_reference(Path(args.report))
        print(f"results: {Path(args.report) / 'README.md'}")
        return 0
    try:
        plan = _plan(args)
    except ValueError as exc:
        sys.stderr.write(f"distcomp bench: error: {exc}\n")
        return EXIT_USAGE
    reason = netns.cannot_create_reason()
    if reason is not None:
        sys.stderr.write(f"distcomp bench: error: {reason}\n")
        return EXIT_USAGE
    from distcomp.bench.results import execute

    folder = _results_folder(args)
    try:
        with netns.signals_raise():
            command = " ".join(["distcomp", "bench", *sys.argv[2:]])
            execute(folder, *plan, dense=args.dense, model="smoke" if args.smoke else "gpt", command=command)
    except (netns.Terminated, KeyboardInterrupt) as exc:
        sys.stderr.write(
            f"distcomp bench: stopped ({exc or 'Ctrl-C'}); namespaces removed; partial results in {folder}\n"
        )
        return 128 + 15 if isinstance(exc, netns.Terminated) else 130
    print(f"results: {folder / 'README.md'}")
    return 0
