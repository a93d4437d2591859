"""``distcomp check gpu``: prove the GPU path in one command (see :mod:`distcomp.check.gpu`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from distcomp.check.gpu import ROOT, SECTIONS, run, table, training_cases, write_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``check gpu`` (shared by ``python -m distcomp.check`` and ``distcomp check``)."""
    p.add_argument("what", choices=["gpu"], help="what to check")
    p.add_argument(
        "--device", choices=["cuda", "cpu"], default=None, help="default: cuda (cpu: the CPU-checkable parts)"
    )
    p.add_argument("--quick", action="store_true", help="a small plan (what CI runs on the CPU)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: benchmarks/results in a checkout)")
    p.add_argument("--plan", action="store_true", help="print what would run, and run nothing")


def check(args: argparse.Namespace) -> int:
    """Run the check; exit status 1 if any row failed, 2 for a request that cannot run here."""
    device = args.device or "cuda"
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        print(f"distcomp check gpu: unknown sections {unknown}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if args.plan:
        print(f"device {device}; sections: {', '.join(sections)}")
        print("training cases: " + ", ".join(c.name for c in training_cases(args.quick)))
        return 0
    if device == "cuda" and not torch.cuda.is_available():
        print(
            "distcomp check gpu: no CUDA device here; pass --device cpu to run the CPU-checkable parts", file=sys.stderr
        )
        return 2
    rows = run(device, args.quick, sections)
    print(table(rows))
    out = args.out or (ROOT / "benchmarks" / "results" if (ROOT / "benchmarks").is_dir() else Path.cwd())
    for path in write_report(rows, device, args.quick, out):
        print(f"report: {path}")
    failed = [r for r in rows if r.status == "fail"]
    print(f"{len(rows) - len(failed)} of {len(rows)} rows passed or informational; {len(failed)} failed")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m distcomp.check gpu [options]``."""
    parser = argparse.ArgumentParser(prog="python -m distcomp.check", description=__doc__)
    add_arguments(parser)
    return check(parser.parse_args(argv))
