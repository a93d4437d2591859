"""``distcomp check gpu``: the GPU path proved in one run, with a pass/fail table and a JSON report.

    python -m distcomp.check gpu                 # on a GPU machine, from a source checkout: under 8 minutes
    python -m distcomp.check gpu --device cpu --quick    # what CI runs: the same plan on the CPU, small

Sections, each a list of rows (pass, fail, skip or info):

1. ``kernels``: the Triton kernel tests (``tests/kernels``) on CUDA tensors;
   on the CPU, Triton's interpreter.
2. ``kernel-bench``: ``benchmarks/kernels.py`` (each op checked against its
   reference first, then timed); the streaming ops' bandwidth over a same-run
   ``clone()`` must reach 0.8 at 16M values and more on a GPU.
3. ``training``: every compressor through a DDP comm hook (both overlap
   modes, and under fp16 autocast with a GradScaler), the compressed
   optimizers and FSDP2's compressed reduce-scatter, at world size 1 (NCCL on
   a GPU). ``none`` must equal DDP bit for bit; on a GPU, a run with
   ``CUDA_LAUNCH_BLOCKING=1`` must give what the asynchronous run gave (a
   stream race would not), and the GPU must agree with the CPU over gloo
   within each case's tolerance. With two GPUs the same at world size 2.
4. ``step-time``: the 10.9M GPT's step with each compressor over the same
   step sending nothing (world size 1: the codec's cost on this device).

The first two need a source checkout (``tests/``, ``benchmarks/``) and are
skipped, saying so, without one.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from distcomp.check.workload import Case, case_json

ROOT = Path(__file__).resolve().parents[2]
"""The source checkout this package was installed from (editable installs), if it is one."""
SECTIONS = ("kernels", "kernel-bench", "training", "step-time")
COMPRESSORS: dict[str, dict[str, Any]] = {
    "none": {},
    "fp16": {},
    "bf16": {},
    "powersgd": {"rank": 2},
    "topk": {"ratio": 0.05},
    "randomk": {"ratio": 0.25},
    "sign": {},
    "int8": {},
    "int4": {},
}
LOSSY = {"sign", "int4", "topk", "randomk"}
"""Compressors whose output flips with the smallest change of input (a sign, a rounding, a selection)."""
STREAMING_TARGET = 0.8
"""Fraction of a same-run ``clone()``'s bandwidth the streaming kernels must reach at 16M values and more."""
NOT_STREAMING = {"topk_pack"}
"""Ops that select (a top-k) rather than stream: reported, without the target."""


@dataclass
class Row:
    """One line of the report."""

    section: str
    check: str
    status: str
    """``pass``, ``fail``, ``skip`` or ``info``."""
    detail: str = ""
    value: float | None = None


# -- section 1 and 2: kernels ------------------------------------------------------


def kernel_tests(device: str, quick: bool) -> list[Row]:
    """Run the kernel tests in a child process (Triton's interpreter is chosen at import) and report them."""
    tests = ROOT / "tests" / "kernels"
    if not tests.is_dir():
        return [Row("kernels", "kernel tests", "skip", "needs a source checkout (tests/kernels)")]
    env = dict(os.environ)
    if device == "cuda":
        env.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
        cmd += [str(tests / "test_kernels_triton.py"), "-k", "pack_unpack_signs"] if quick else [str(tests)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if not report.exists():
            return [Row("kernels", "kernel tests", "fail", _tail(proc.stdout + proc.stderr))]
        return _junit_rows(ET.parse(report).getroot(), device)


def _junit_rows(root: ET.Element, device: str) -> list[Row]:
    cases = list(root.iter("testcase"))
    failed = [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
    skipped = [c for c in cases if c.find("skipped") is not None]
    ran = len(cases) - len(skipped)
    status = "fail" if failed or not ran else "pass"
    rows = [
        Row("kernels", f"kernel tests on {device}", status, f"{ran - len(failed)}/{ran} passed, {len(skipped)} skipped")
    ]
    for case in failed[:20]:
        problem = case.find("failure")
        problem = problem if problem is not None else case.find("error")
        message = problem.get("message", "") if problem is not None else ""
        rows.append(Row("kernels", case.get("name", "?"), "fail", message[:300]))
    return rows


def kernel_bench(device: str, quick: bool) -> list[Row]:
    """Run ``benchmarks/kernels.py`` and check the streaming ops against the copy bandwidth."""
    script = ROOT / "benchmarks" / "kernels.py"
    if not script.exists():
        return [Row("kernel-bench", "kernel benchmark", "skip", "needs a source checkout (benchmarks/kernels.py)")]
    sizes = "1M" if quick else "1M,16M,64M"
    # Half a second of timed calls per measurement keeps the whole check within 8 minutes on one GPU.
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "kernels.json"
        cmd = [sys.executable, str(script), "--device", device, "--sizes", sizes, "--no-save", "--json", str(out)]
        cmd += ["--kernels", "sign_encode,sign_decode", "--budget", "0.2"] if quick else ["--budget", "0.5"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        if not out.exists():
            return [Row("kernel-bench", "kernel benchmark", "fail", _tail(proc.stdout + proc.stderr))]
        results = json.loads(out.read_text())["results"]
    return [_bench_row(r, device) for r in results]


def _bench_row(result: dict[str, Any], device: str) -> Row:
    cfg = result["config"]
    name = f"{cfg['kernel']} {cfg['numel'] / 2**20:g}M"
    if result["failure"]:
        return Row("kernel-bench", name, "fail", f"differs from the reference: {result['failure'][:200]}")
    ratio = result["x_copy"]
    detail = f"{result['gbps']:.1f} GB/s, {ratio:.2f}x copy ({result['backend']})"
    targeted = device == "cuda" and cfg["numel"] >= 16 * 2**20 and cfg["kernel"] not in NOT_STREAMING
    if not targeted:
        return Row("kernel-bench", name, "info", detail, ratio)
    status = "pass" if ratio >= STREAMING_TARGET else "fail"
    return Row("kernel-bench", name, status, f"{detail}; target {STREAMING_TARGET}x", ratio)


# -- section 3 and 4: training through distcomp -------------------------------------


def training_cases(quick: bool) -> list[Case]:
    """The plan of section 3: the exact reference, every hook, the optimizers, FSDP2."""
    if quick:
        return [
            Case(name="ddp", kind="ddp"),
            Case(name="none/overlap", method="none"),
            Case(name="powersgd/overlap", method="powersgd", options={"rank": 2}),
            Case(name="sign/inline", method="sign", overlap=False),
            Case(name="OneBitAdam/overlap", kind="optim", method="OneBitAdam", options={"freeze_step": 2}),
            Case(name="fsdp/int8", kind="fsdp", method="int8"),
        ]
    cases = [Case(name="ddp", kind="ddp"), Case(name="ddp/amp", kind="ddp", amp=True)]
    for name, options in COMPRESSORS.items():
        for overlap in (True, False):
            mode = "overlap" if overlap else "inline"
            cases.append(Case(name=f"{name}/{mode}", method=name, options=options, overlap=overlap))
        cases.append(Case(name=f"{name}/amp", method=name, options=options, amp=True))
    optims = {"OneBitAdam": {"freeze_step": 2}, "ZeroOneAdam": {"var_freeze_step": 2}, "OneBitLamb": {"freeze_step": 2}}
    for name, options in optims.items():
        for overlap in (True, False):
            mode = "overlap" if overlap else "inline"
            cases.append(Case(name=f"{name}/{mode}", kind="optim", method=name, options=options, overlap=overlap))
    for name in ("none", "int8", "sign", "topk"):
        cases.append(Case(name=f"fsdp/{name}", kind="fsdp", method=name, options=COMPRESSORS[name]))
    return cases


def launch(
    device: str, world: int, cases: list[Case], *, env: dict[str, str] | None = None, time_steps: int = 0
) -> dict[str, Any]:
    """Run ``cases`` in ``world`` worker processes on ``device``; rank 0's results."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.pt"
        base = [sys.executable, "-m", "distcomp.check.workload", "--device", device, "--world", str(world)]
        base += ["--store", str(Path(tmp) / "store"), "--out", str(out), "--cases", case_json(cases)]
        base += ["--time", str(time_steps)]
        full_env = {**os.environ, **(env or {})}
        procs = [
            subprocess.Popen(
                [*base, "--rank", str(r)], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            for r in range(world)
        ]
        logs = [p.communicate(timeout=1200)[0] for p in procs]
        if any(p.returncode for p in procs) or not out.exists():
            raise RuntimeError(f"the {device} worker failed: {_tail(''.join(logs))}")
        return torch.load(out, weights_only=False)


def training(device: str, quick: bool) -> list[Row]:
    """Section 3: run the cases on ``device`` (and, on a GPU, again blocking and on the CPU); compare."""
    cases = training_cases(quick)
    rows: list[Row] = []
    runs = {"main": _try_launch(device, 1, cases, rows)}
    if device == "cuda":
        runs["blocking"] = _try_launch(device, 1, cases, rows, env={"CUDA_LAUNCH_BLOCKING": "1"})
        runs["cpu"] = _try_launch("cpu", 1, cases, rows)
    main = runs["main"]
    if main is None:
        return rows
    for case in cases:
        rows += _case_rows(case, main, runs.get("blocking"), runs.get("cpu"), device)
    if device == "cuda" and torch.cuda.device_count() >= 2:
        two = {d: _try_launch(d, 2, cases, rows) for d in ("cuda", "cpu")}
        if two["cuda"] is not None and two["cpu"] is not None:
            for case in cases:
                rows.append(_agreement("world 2: nccl vs gloo", case, two["cuda"], two["cpu"]))
    return rows


def _try_launch(device: str, world: int, cases: list[Case], rows: list[Row], **kw: Any) -> dict[str, Any] | None:
    try:
        return launch(device, world, cases, **kw)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        rows.append(Row("training", f"{device} worker, world {world}", "fail", str(exc)[-600:]))
        return None


def _case_rows(
    case: Case, main: dict[str, Any], blocking: dict[str, Any] | None, cpu: dict[str, Any] | None, device: str
) -> list[Row]:
    got = main.get(case.name)
    if not isinstance(got, torch.Tensor):
        return [Row("training", f"{case.name}: runs on {device}", "fail", str(got)[-600:])]
    rows = [
        Row(
            "training",
            f"{case.name}: runs on {device}",
            "pass",
            f"{got.numel()} parameters, finite: {bool(torch.isfinite(got).all())}",
        )
    ]
    if not torch.isfinite(got).all():
        rows[-1].status = "fail"
    if case.kind == "hook" and case.method == "none":
        exact = main.get("ddp/amp" if case.amp else "ddp")
        if isinstance(exact, torch.Tensor):
            same = torch.equal(got, exact)
            rows.append(
                Row("training", f"{case.name}: equals DDP's exact mean", "pass" if same else "fail", _diff(got, exact))
            )
    if blocking is not None:
        rows.append(_agreement("CUDA_LAUNCH_BLOCKING=1 (no stream race)", case, main, blocking, tol=1e-6))
    if cpu is not None:
        rows.append(_agreement("agrees with the CPU over gloo", case, main, cpu))
    return rows


def _agreement(what: str, case: Case, a: dict[str, Any], b: dict[str, Any], tol: float | None = None) -> Row:
    x, y = a.get(case.name), b.get(case.name)
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        return Row("training", f"{case.name}: {what}", "fail", "a run of this case failed")
    limit = tol if tol is not None else (5e-2 if case.method in LOSSY or case.amp else 5e-3)
    rel = float((x - y).norm() / y.norm().clamp_min(1e-12))
    return Row(
        "training",
        f"{case.name}: {what}",
        "pass" if rel <= limit else "fail",
        f"relative difference {rel:.2e} (limit {limit:g})",
        rel,
    )


def step_time(device: str, quick: bool) -> list[Row]:
    """Section 4: each compressor's step over the step sending nothing, on ``device``."""
    names = ["none", "powersgd", "sign"] if quick else list(COMPRESSORS)
    cases = [Case(name="bound", kind="bound"), Case(name="ddp", kind="ddp")]
    cases += [Case(name=n, method=n, options=COMPRESSORS[n]) for n in names]
    rows: list[Row] = []
    times = _try_launch(device, 1, cases, rows, time_steps=3 if quick else 10)
    if times is None or not isinstance(times.get("bound"), float):
        return rows or [Row("step-time", "bound", "fail", str((times or {}).get("bound"))[-600:])]
    bound = times["bound"]
    rows.append(Row("step-time", "bound (model alone)", "info", f"{bound * 1e3:.1f} ms per step", bound))
    for case in cases[1:]:
        t = times.get(case.name)
        if not isinstance(t, float):
            rows.append(Row("step-time", case.name, "fail", str(t)[-600:]))
            continue
        rows.append(Row("step-time", case.name, "info", f"{t * 1e3:.1f} ms, {t / bound:.2f}x the bound", t / bound))
    return rows


# -- the report -------------------------------------------------------------------------


def run(device: str, quick: bool, sections: list[str]) -> list[Row]:
    """Every requested section, in order."""
    funcs = {"kernels": kernel_tests, "kernel-bench": kernel_bench, "training": training, "step-time": step_time}
    rows: list[Row] = []
    for name in sections:
        rows += funcs[name](device, quick)
    return rows


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    lines = ["| section | check | status | detail |", "|---|---|---|---|"]
    lines += [
        f"| {r.section} | {r.check} | {r.status.upper() if r.status == 'fail' else r.status} | {r.detail} |"
        for r in rows
    ]
    return "\n".join(lines)


def write_report(rows: list[Row], device: str, quick: bool, out: Path) -> tuple[Path, Path]:
    """``<date>-gpu-check-<device>.json`` and ``.md`` under ``out`` (``-2``, ... for later runs); their paths."""
    now = datetime.datetime.now()
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"{now:%Y-%m-%d}-gpu-check-{device}{'-quick' if quick else ''}"
    stem, n = base, 1
    while stem.with_suffix(".json").exists() or stem.with_suffix(".md").exists():  # never replace another run's
        n += 1
        stem = base.with_name(f"{base.name}-{n}")
    doc = {
        "name": "gpu-check",
        "date": now.isoformat(timespec="seconds"),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "torch": torch.__version__,
        "quick": quick,
        "passed": not any(r.status == "fail" for r in rows),
        "rows": [asdict(r) for r in rows],
    }
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    head = f"# distcomp check gpu: {device}{' (quick)' if quick else ''}, {doc['date']}\n\n"
    stem.with_suffix(".md").write_text(head + f"{doc['gpu'] or 'CPU'}; torch {doc['torch']}\n\n" + table(rows) + "\n")
    return stem.with_suffix(".json"), stem.with_suffix(".md")


def _diff(a: torch.Tensor, b: torch.Tensor) -> str:
    return "bit-identical" if torch.equal(a, b) else f"max |difference| {float((a - b).abs().max()):.3e}"


def _tail(text: str, n: int = 1500) -> str:
    return text[-n:].strip()
