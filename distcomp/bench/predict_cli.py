"""``distcomp bench predict``: each method's predicted step, speedup over DDP and time-to-loss factor on the
networks and world sizes asked for, and a recommendation with its reason.

The model's shapes come from a module (``--model pkg.mod:Class``, built with no arguments; default the
benchmark's 10.9M GPT), a shape list (``--shapes 768x3072,3072x768,768``) or a parameter count
(``--params 125e6``: a GPT-shaped stand-in). The compute time of a step is measured for the default GPT
(``--batch`` sequences on ``--device``) and must be given (``--compute-ms``) otherwise. Time-to-loss
factors are the steps each method needed to reach plain DDP's loss in the committed benchmark run
(:mod:`distcomp.bench.reference`), measured on the 10.9M GPT, not on your model.
"""

from __future__ import annotations

import argparse
import importlib
import math
import re
import statistics
import sys
import time
from collections.abc import Sequence

import torch

from distcomp.bench import methods as methods_mod
from distcomp.bench import netns, reference
from distcomp.bench.predict import Forecast, Network, Workload, predict
from distcomp.bench.report import table
from distcomp.bench.traffic import Shape
from distcomp.models.gpt import GPT

WORLDS = (8, 16, 32, 64, 128, 256, 512, 1024)
EXIT_USAGE = 2
_LATENCY_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``distcomp bench predict``."""
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--model", help="MODULE:CLASS built with no arguments (default: the 10.9M GPT)")
    what.add_argument("--shapes", help="comma-separated parameter shapes, e.g. 768x3072,3072x768,768")
    what.add_argument("--params", type=float, help="a parameter count: a GPT-shaped stand-in of that size")
    parser.add_argument("--compute-ms", type=float, help="forward+backward+optimizer of one rank's batch, in ms")
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank when measuring the GPT (default 8)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where compute and codecs run")
    parser.add_argument("--world", default=",".join(map(str, WORLDS)), help="comma-separated world sizes")
    parser.add_argument("--bandwidth", default="100mbit,1gbit,10gbit", help="comma-separated link rates per host")
    parser.add_argument("--latency", default="50us", help="latency per message, e.g. 50us or 0.2ms (default 50us)")
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP's bucket size (default 25)")
    parser.add_argument("--methods", help="comma-separated methods (default: all)")


def parse_latency(text: str) -> float:
    """Seconds of ``50us``, ``0.2ms`` or ``0.001s``."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e-?\d+)?)\s*(s|ms|us)\s*", text.lower())
    if match is None:
        raise ValueError(f"latency {text!r} is not a time like 50us, 0.2ms or 0.001s")
    return float(match.group(1)) * _LATENCY_UNITS[match.group(2)]


def gpt_like_shapes(params: float) -> list[Shape]:
    """A GPT-shaped stand-in with about ``params`` parameters: ``L`` layers of width ``d`` (12 d^2 each) and
    an embedding (GPT-2's vocabulary from 50M parameters up, bytes below)."""
    if params < 1e5:
        raise ValueError(f"--params {params:g} is too small for a GPT-shaped stand-in (at least 1e5)")
    layers, vocab = (12, 50304) if params >= 5e7 else (6, 256)
    # 12 L d^2 + vocab d = params, for d.
    d = (-vocab + math.sqrt(vocab**2 + 48 * layers * params)) / (24 * layers)
    d = max(64, int(round(d / 64)) * 64)
    block = [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,), (d,), (d,)]
    return [(vocab, d), *(block * layers), (d,), (d,)]


def _shapes(args: argparse.Namespace) -> tuple[list[Shape], torch.nn.Module | None]:
    if args.shapes:
        try:
            return [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")], None
        except ValueError:
            raise ValueError(f"--shapes {args.shapes!r}: give shapes like 768x3072,3072x768,768") from None
    if args.params:
        return gpt_like_shapes(args.params), None
    module, _, name = (args.model or "distcomp.models.gpt:GPT").partition(":")
    try:
        model = getattr(importlib.import_module(module), name)()
    except (ImportError, AttributeError, TypeError) as exc:
        raise ValueError(f"--model {args.model!r}: cannot build it with no arguments ({exc})") from None
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad], model


def measure_compute(model: GPT, batch: int, device: str) -> float:
    """Median seconds of a forward + backward + AdamW step of the GPT on ``batch`` random sequences."""
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, model.cfg.vocab_size, (batch, model.cfg.context), device=device)
    times = []
    for i in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _workload(args: argparse.Namespace) -> Workload:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here; predict with --device cpu or on a GPU machine")
    shapes, model = _shapes(args)
    if args.compute_ms is not None:
        compute = args.compute_ms / 1e3
    elif isinstance(model, GPT):
        compute = measure_compute(model, args.batch, args.device)
    else:
        raise ValueError(
            "give --compute-ms: the time of one forward+backward+optimizer step of your model on one device "
            "(e.g. the step time of a single-GPU run)"
        )
    return Workload(shapes=tuple(shapes), compute_s=compute, bucket_cap_mb=args.bucket_cap_mb, device=args.device)


def run(args: argparse.Namespace) -> int:
    """``distcomp bench predict``: print the tables; the exit code."""
    try:
        worlds = [int(w) for w in args.world.split(",")]
        rates = [r.strip() for r in args.bandwidth.split(",")]
        nets = [Network(bandwidth_bits=netns.rate_bits(r), latency_s=parse_latency(args.latency)) for r in rates]
        chosen = methods_mod.select(args.methods.split(",") if args.methods else None, warmup=3)
        wl = _workload(args)
    except ValueError as exc:
        sys.stderr.write(f"distcomp bench predict: error: {exc}\n")
        return EXIT_USAGE
    forecast = predict(chosen, wl, nets, worlds, reps=2)
    print(render(forecast, chosen, wl, nets, rates, worlds))
    return 0


def render(
    forecast: Forecast,
    chosen: Sequence[methods_mod.Method],
    wl: Workload,
    nets: Sequence[Network],
    rates: Sequence[str],
    worlds: Sequence[int],
) -> str:
    """Every table, its recommendation, the notes and the validation figure."""
    factors = reference.steps_factors()
    numel = sum(math.prod(s) for s in wl.shapes)
    out = [
        f"Predicted (not measured): {numel / 1e6:.1f}M parameters, compute {wl.compute_s * 1e3:.0f} ms per step on "
        f"{wl.device}, DDP buckets {wl.bucket_cap_mb:g} MB, latency {nets[0].latency_s * 1e6:.0f} us, "
        f"goodput {nets[0].efficiency:.0%} of the link. Each cell: step ms, speedup over DDP, time-to-loss x DDP."
    ]
    for rate, net in zip(rates, nets):
        rows = []
        for m in chosen:
            row = [m.name]
            for w in worlds:
                p, ddp = forecast.get(m.name, net, w), forecast.get("ddp", net, w) if _has(chosen, "ddp") else None
                speed = ddp.step_s / p.step_s if ddp else None
                ttl = (1 / speed) * factors[m.name] if speed and m.name in factors else None
                row.append(f"{p.step_s * 1e3:.0f} · {_x(speed)} · {_x(ttl)}")
            rows.append(row)
        rows.append(["recommended", *[recommend(forecast, chosen, net, w, factors)[0] for w in worlds]])
        out += [f"\n## {rate}\n", table(["method", *[f"{w} ranks" for w in worlds]], rows)]
        out.append("\n" + recommend(forecast, chosen, net, worlds[len(worlds) // 2], factors)[1])
    for name, lines in forecast.notes.items():
        out.append(f"\nnote, {name}: " + "; ".join(dict.fromkeys(lines)))
    out.append("\n" + reference.validation_line())
    return "\n".join(out)


def _has(chosen: Sequence[methods_mod.Method], name: str) -> bool:
    return any(m.name == name for m in chosen)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def recommend(
    forecast: Forecast, chosen: Sequence[methods_mod.Method], net: Network, world: int, factors: dict[str, float]
) -> tuple[str, str]:
    """The method with the shortest predicted time-to-loss at ``world`` ranks, and why."""
    candidates = [m.name for m in chosen if m.name != "noop"]
    ttl = {n: forecast.get(n, net, world).step_s * factors.get(n, 1.0) for n in candidates}
    best = min(ttl, key=lambda n: ttl[n])
    if "ddp" not in ttl:
        return best, f"At {world} ranks: {best} has the shortest predicted time-to-loss."
    ddp = forecast.get("ddp", net, world)
    wire = ddp.exposed_s / ddp.step_s
    if best == "ddp" or ttl[best] > 0.95 * ttl["ddp"]:
        return "ddp", (
            f"At {world} ranks: plain DDP. It waits on the network for {wire:.0%} of its "
            f"{ddp.step_s * 1e3:.0f} ms step, so compression has little to win and costs encode/decode time."
        )
    p = forecast.get(best, net, world)
    steps = (
        f"steps factor {factors[best]:.2f} from the benchmark run"
        if best in factors
        else "no measured steps factor: assumed to need as many steps as DDP"
    )
    return best, (
        f"At {world} ranks: {best}. DDP spends {ddp.exposed_s * 1e3:.0f} of its {ddp.step_s * 1e3:.0f} ms step "
        f"waiting on the network for {ddp.sent_mb:.0f} MB; {best} sends {p.sent_mb:.2f} MB for "
        f"{p.codec_s * 1e3:.0f} ms of encode/decode, and its time-to-loss is predicted at "
        f"{ttl[best] / ttl['ddp']:.2f}x DDP's ({steps})."
    )
