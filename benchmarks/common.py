"""What the benchmarks share: training data and digests, the output options, tables, and the results writer.

Every benchmark writes each run to ``benchmarks/results/<YYYY-MM-DD>-<name>.json`` (the machine, torch,
the command line, the commit and every figure) and ``<YYYY-MM-DD>-<name>.md`` (the tables it printed),
unless ``--no-save``; ``--out DIR`` writes them elsewhere. The data and digests are
:mod:`distcomp.bench.data`, shared with ``distcomp bench``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from distcomp.bench import data

RESULTS_DIR = Path(__file__).resolve().parent / "results"
"""Where the dated results files go by default."""
ROOT = RESULTS_DIR.parents[1]

logger = logging.getLogger("distcomp.bench")

Figures = Sequence[tuple[str, str, str]]
"""Columns of a results table: ``(column, field of the result, format spec)``."""


# -- training data (shared with distcomp bench) ----------------------------------------------

corpus, batch, param_digest = data.corpus, data.batch, data.param_digest


# -- command line and progress -------------------------------------------------------------


def make_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of a benchmark's docstring."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0])


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """``--json PATH``, ``--out DIR`` and ``--no-save``: where :func:`write_results` writes."""
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    parser.add_argument(
        "--out",
        default=str(RESULTS_DIR),
        metavar="DIR",
        help="folder of the dated results, <YYYY-MM-DD>-<name>.json and .md (default: benchmarks/results)",
    )
    parser.add_argument("--no-save", action="store_true", help="write no dated results files")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; a usage error before a long run if ``--out`` names a file rather than a folder."""
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix in (".md", ".json") or out.is_file():
        parser.error(f"--out {out}: give a folder; the results go to <YYYY-MM-DD>-<name>.json and .md inside it")
    return args


def log_to_console(prefix: str = "") -> None:
    """Progress lines on stderr, stamped with the time; a no-op where logging is already set up."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S")


# -- figures and tables --------------------------------------------------------------------


def median_step(series: Iterable[Sequence[float]], combine: Callable[..., float] = max) -> float:
    """Median over steps of ``combine`` (max: the slower rank) over ranks; one sequence per rank."""
    return statistics.median(combine(step) for step in zip(*series, strict=True))


def ratio(values: dict[str, float], key: str, base: str | None) -> float | None:
    """``values[key]`` over the baseline ``values[base]`` of the same run; None without a baseline."""
    return values[key] / values[base] if base is not None and base in values else None


def fmt(x: float | None, spec: str) -> str:
    """``x`` formatted by ``spec``; ``-`` for a figure that does not apply."""
    return "-" if x is None else format(x, spec)


def results_table(
    results: Sequence[Any], lead: Sequence[str], cells: Callable[[Any], Sequence[str]], figures: Figures
) -> str:
    """A markdown table of results: ``lead`` columns filled by ``cells(result)``, then one column per figure.

    ``figures`` holds ``(column, field of the result, format)``; a result whose ``failure`` is set shows
    the failure in place of its figures (a wrong result gets no speed).
    """
    rows = []
    for r in results:
        if r.failure:
            rows.append([*cells(r), f"FAILED: {r.failure}", *[""] * (len(figures) - 1)])
        else:
            rows.append([*cells(r), *(fmt(getattr(r, field), spec) for _, field, spec in figures)])
    return markdown_table([*lead, *(column for column, _, _ in figures)], rows)


def across_links(
    lead: Sequence[str], links: Sequence[str], series: Sequence[Iterable[tuple[tuple[str, ...], str, str | None]]]
) -> str:
    """A markdown table of one run's series on several links: a row per method, a column per link.

    ``series[i]`` holds link ``links[i]``'s methods as ``(lead cells, x bound cell, MB sent cell or None)``;
    a method missing from a link shows ``-`` there, and its bytes come from the last link that had them.
    """
    cells: dict[tuple[str, ...], dict[str, str]] = {}
    sent: dict[tuple[str, ...], str] = {}
    for link, rows in zip(links, series, strict=True):
        for key, cell, mb in rows:
            cells.setdefault(key, {})[link] = cell
            if mb is not None:
                sent[key] = mb
    return markdown_table(
        [*lead, *(f"x bound, {link}" for link in links), "MB sent/step"],
        [[*key, *(c.get(link, "-") for link in links), sent.get(key, "-")] for key, c in cells.items()],
    )


def markdown_row(cells: Sequence[str]) -> str:
    """One row of a markdown table."""
    return "| " + " | ".join(cells) + " |"


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A markdown table: the header, its rule, then ``rows``."""
    return "\n".join([markdown_row(columns), "|" + "---|" * len(columns), *map(markdown_row, rows)])


# -- results files -------------------------------------------------------------------------


def git_revision() -> str:
    """The checkout's commit, with ``+dirty`` when files differ from it ("unknown" outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The shell line that ran ``script`` with ``argv`` (the process's own arguments when None)."""
    path = Path(script).resolve()
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return shlex.join(["python", str(shown), *(sys.argv[1:] if argv is None else argv)])


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_results(
    args: argparse.Namespace, name: str, *, title: str, command: str, report: str, figures: dict[str, Any]
) -> list[Path]:
    """Write one run: the dated JSON and markdown under ``args.out`` (unless ``--no-save``), the JSON to ``--json``.

    ``report`` is the text the benchmark printed (its tables); ``figures`` every number, JSON-ready. A second
    run on the same day gets ``-2``, ``-3``, ... rather than replacing the first. Returns the paths written.
    """
    now = datetime.datetime.now()
    doc = {
        "name": name,
        "date": now.isoformat(timespec="seconds"),
        "command": command,
        "git": figures.get("git") or git_revision(),
        "torch": torch.__version__,
        "machine": machine(),
        **figures,
    }
    text = json.dumps(doc, indent=2) + "\n"
    written = []
    if args.json:
        Path(args.json).write_text(text)
        written.append(Path(args.json))
    if not args.no_save:
        stem = _free_stem(Path(args.out), f"{now:%Y-%m-%d}-{name}")
        stem.with_suffix(".json").write_text(text)
        stem.with_suffix(".md").write_text(_markdown(doc, title, report))
        written += [stem.with_suffix(".json"), stem.with_suffix(".md")]
    for path in written:
        logger.info("results written to %s", path)
    return written


def _free_stem(folder: Path, stem: str) -> Path:
    """``folder/stem``, or ``folder/stem-N`` with the first N whose files do not exist yet."""
    folder.mkdir(parents=True, exist_ok=True)
    path, n = folder / stem, 1
    while path.with_suffix(".json").exists() or path.with_suffix(".md").exists():
        n += 1
        path = folder / f"{stem}-{n}"
    return path


def _markdown(doc: dict[str, Any], title: str, report: str) -> str:
    """The results page: title and date, the command, the machine and commit, then the printed report."""
    m = doc["machine"]
    where = f"{m['processor']}, {m['usable_cpus']} of {m['cpus']} CPUs" + (f", {m['gpu']}" if "gpu" in m else "")
    return (
        f"# {title} ({doc['date'][:10]})\n\n`{doc['command']}`\n\n"
        f"{where}; {m['platform']}; Python {m['python']}; torch {doc['torch']}; commit {doc['git']}\n\n"
        f"{report.strip()}\n"
    )
