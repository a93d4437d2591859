"""Speed of every pack/unpack kernel against the memory-bandwidth roof and the reference.

    python benchmarks/kernels.py                          # CPU: the reference path, 1M..64M values
    python benchmarks/kernels.py --device cuda            # GPU: Triton vs reference, 1M..256M values
    python benchmarks/kernels.py --kernels sign_encode,topk_pack --sizes 1M,16M --json out.json
    python benchmarks/kernels.py --out /tmp/runs           # results files elsewhere (default: benchmarks/results,
                                                          # <date>-kernels-<device>.json and .md; --no-save: none)

For each kernel and size: the median time of the public op (Triton on CUDA,
the reference elsewhere), its effective bandwidth (bytes read + bytes written,
counted from the op's definition, over the time), the ratio of that to a
``torch.clone`` of the input measured in the same run (the copy reads and
writes the input once: the memory-bandwidth roof of the device), and, on CUDA,
the speed-up over the reference (``*_ref``) run on the same CUDA tensors.

Targets: on a GPU, every kernel at >= 70% of the copy's bandwidth and >= 5x
faster than the reference; on CPU, the reference path at >= 30% of the copy's.

Correctness comes first: at every size the op's result is checked against the
reference (bit for bit where the math is exact) before anything is timed, and
a kernel that fails is reported as failed, without a speed.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from distcomp import kernels as K

try:
    from benchmarks import common
except ImportError:  # run as a script: the script's own folder is on sys.path
    import common

logger = logging.getLogger("distcomp.bench.kernels")

MiB = 2**20
SIGN_BLOCK = 2048
"""The ``sign`` compressor's default block."""
QUANT_BLOCK = 256
"""The ``int8``/``int4`` compressors' default block."""
TOPK_RATIO = 0.01
"""The ``topk`` compressor's default ratio."""
TARGET_GPU_COPY, TARGET_GPU_SPEEDUP, TARGET_CPU_COPY = 0.70, 5.0, 0.30

Inputs = dict[str, Any]


@dataclass(frozen=True)
class Kernel:
    """One public op in the benchmark: how to build its inputs, run it, run its reference, count its bytes."""

    setup: Callable[[int, torch.device], Inputs]
    op: Callable[[Inputs], Any]
    ref: Callable[[Inputs], Any]
    bytes_moved: Callable[[int], int]
    """Bytes read plus bytes written by one call on ``n`` values (fp32 data unless stated)."""
    check: Callable[[Any, Any, Inputs], None]
    """Raises ``AssertionError`` if the op's result does not match the reference's."""
    mutates: tuple[str, ...] = ()
    """Inputs the call writes in place (copied for the correctness check, so op and reference start alike)."""


def _x(n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """``n`` seeded normal fp32 values on ``device`` (drawn on the CPU: the same data on every device)."""
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(device)


def _equal(got: Any, want: Any, inputs: Inputs) -> None:
    """Bit for bit (one tensor or a tuple of them)."""
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for g, w in zip(got, want):
        assert torch.equal(g, w), f"{g.dtype} results differ"


def _close(got: Any, want: Any, inputs: Inputs) -> None:
    """Within float tolerance (sums whose order differs)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _encoded(got: Any, want: Any, inputs: Inputs) -> None:
    """Bits exact, scales within float tolerance (summation order)."""
    assert torch.equal(got[0], want[0]), "bits differ"
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=0.0)


def _quantized(got: Any, want: Any, inputs: Inputs, x: torch.Tensor | None = None) -> None:
    """Scales exact; stochastic codes within one step of ``x / scale`` (the random streams differ)."""
    assert torch.equal(got[1], want[1]), "scales differ"
    q = got[0] if inputs["bits"] == 8 or got[0].dtype == torch.int8 else K.unpack_int4(got[0])
    q = q.view(torch.int8).float().view(-1, inputs["block"])
    x = inputs["x"] if x is None else x
    v = x.view(-1, inputs["block"]) / got[1].view(-1, 1).clamp_min(1e-30)
    assert float((q - v).abs().max()) < 1.0 + 1e-4, "a code is more than one step away"


def _quantized_ef(got: Any, want: Any, inputs: Inputs) -> None:
    """:func:`_quantized` of ``x + residual``."""
    _quantized(got, want, inputs, inputs["x"] + inputs["residual"])


def _topk(got: Any, want: Any, inputs: Inputs) -> None:
    """The same magnitudes (ties may pick different indices), each value read from its index."""
    k = got.numel() // 2
    values, indices = got[:k].view(torch.float32), got[k:].long()
    assert torch.equal(values, inputs["x"][indices]), "values do not match their indices"
    assert torch.equal(values.abs().sort().values, want[:k].view(torch.float32).abs().sort().values), "not the top-k"


def _sign_setup(n: int, device: torch.device) -> Inputs:
    """Rows of one sign block, their encoding, a residual and an output buffer."""
    x = _x(n, device).view(-1, SIGN_BLOCK)
    bits, scales = K.sign_encode_ref(x, SIGN_BLOCK)
    return {
        "x": x,
        "bits": bits,
        "scales": scales,
        "residual": _x(n, device, 1).view_as(x) * 0.1,
        "out": torch.zeros(n, device=device),
    }


def _quant_setup(bits: int) -> Callable[[int, torch.device], Inputs]:
    """The setup of the ``bits``-bit kernels (one function per width, so that inputs are shared between them)."""

    def setup(n: int, device: torch.device) -> Inputs:
        """Rows of one quantization block, their codes (packed and not), scales and an output buffer."""
        x = _x(n, device).view(-1, QUANT_BLOCK)
        codes, scales = K.quantize_codes_ref(x, bits, QUANT_BLOCK)
        return {
            "x": x,
            "bits": bits,
            "block": QUANT_BLOCK,
            "codes": codes,
            "scales": scales,
            "q": codes.view(torch.int8) if bits == 8 else K.unpack_int4_ref(codes),
            "out": torch.zeros(n, device=device),
            "residual": _x(n, device, 1).view_as(x) * 0.01,
            "seed": 1234,
        }

    return setup


def _gen(inputs: Inputs) -> torch.Generator:
    """A freshly seeded generator on the data's device, so that op and reference start from the same state."""
    return torch.Generator(device=inputs["x"].device).manual_seed(inputs["seed"])


def _topk_setup(n: int, device: torch.device) -> Inputs:
    """Flat values, ``k`` at the ``topk`` compressor's ratio, one payload and a zeroed output."""
    x = _x(n, device)
    k = max(1, int(n * TOPK_RATIO))
    return {"x": x, "k": k, "payload": K.topk_pack_ref(x, k).view(1, -1), "out": torch.zeros(n, device=device)}


def _scales_bytes(n: int, block: int) -> int:
    """Bytes of the fp32 scales of ``n`` values in blocks of ``block``."""
    return 4 * (n // block)


_quant8, _quant4 = _quant_setup(8), _quant_setup(4)

KERNELS: dict[str, Kernel] = {
    "pack_signs": Kernel(
        _sign_setup,
        lambda i: K.pack_signs(i["x"]),
        lambda i: K.pack_signs_ref(i["x"]),
        lambda n: 4 * n + n // 8,
        _equal,
    ),
    "unpack_signs": Kernel(
        _sign_setup,
        lambda i: K.unpack_signs(i["bits"], i["x"].numel()),
        lambda i: K.unpack_signs_ref(i["bits"], i["x"].numel()),
        lambda n: n // 8 + 4 * n,
        _equal,
    ),
    "sign_encode": Kernel(
        _sign_setup,
        lambda i: K.sign_encode(i["x"], SIGN_BLOCK),
        lambda i: K.sign_encode_ref(i["x"], SIGN_BLOCK),
        lambda n: 4 * n + n // 8 + _scales_bytes(n, SIGN_BLOCK),
        _encoded,
    ),
    "sign_encode_ef": Kernel(
        _sign_setup,
        lambda i: K.sign_encode_ef(i["x"], i["residual"], SIGN_BLOCK, residual_out=i["out"]),
        lambda i: K.sign_encode_ef_ref(i["x"], i["residual"], SIGN_BLOCK, residual_out=i["out"]),
        lambda n: 4 * n + 4 * n + 4 * n + n // 8 + _scales_bytes(n, SIGN_BLOCK),
        _encoded,
        ("out",),
    ),
    "sign_decode": Kernel(
        _sign_setup,
        lambda i: K.sign_decode(i["bits"], i["scales"], SIGN_BLOCK, out=i["out"]),
        lambda i: K.sign_decode_ref(i["bits"], i["scales"], SIGN_BLOCK, out=i["out"]),
        lambda n: n // 8 + _scales_bytes(n, SIGN_BLOCK) + 4 * n,
        _equal,
        ("out",),
    ),
    "sign_decode_add": Kernel(
        _sign_setup,
        lambda i: K.sign_decode_add(i["bits"], i["scales"], SIGN_BLOCK, i["out"], alpha=0.5),
        lambda i: K.sign_decode_add_ref(i["bits"], i["scales"], SIGN_BLOCK, i["out"], alpha=0.5),
        lambda n: n // 8 + _scales_bytes(n, SIGN_BLOCK) + 8 * n,
        _close,
        ("out",),
    ),
    "quantize_int8": Kernel(
        _quant8,
        lambda i: K.quantize_blockwise(i["x"], 8, QUANT_BLOCK, _gen(i)),
        lambda i: K.quantize_blockwise_ref(i["x"], 8, QUANT_BLOCK, _gen(i)),
        lambda n: 4 * n + n + _scales_bytes(n, QUANT_BLOCK),
        _quantized,
    ),
    "quantize_codes_ef_int8": Kernel(
        _quant8,
        lambda i: K.quantize_codes_ef(i["x"], i["residual"], 8, QUANT_BLOCK, _gen(i), residual_out=i["out"]),
        lambda i: K.quantize_codes_ef_ref(i["x"], i["residual"], 8, QUANT_BLOCK, _gen(i), residual_out=i["out"]),
        lambda n: 4 * n + 4 * n + 4 * n + n + _scales_bytes(n, QUANT_BLOCK),
        _quantized_ef,
        ("out",),
    ),
    "quantize_codes_int4": Kernel(
        _quant4,
        lambda i: K.quantize_codes(i["x"], 4, QUANT_BLOCK, _gen(i)),
        lambda i: K.quantize_codes_ref(i["x"], 4, QUANT_BLOCK, _gen(i)),
        lambda n: 4 * n + n // 2 + _scales_bytes(n, QUANT_BLOCK),
        _quantized,
    ),
    "dequantize_int8": Kernel(
        _quant8,
        lambda i: K.dequantize_blockwise(i["q"], i["scales"], QUANT_BLOCK, out=i["out"]),
        lambda i: K.dequantize_blockwise_ref(i["q"], i["scales"], QUANT_BLOCK, out=i["out"]),
        lambda n: n + _scales_bytes(n, QUANT_BLOCK) + 4 * n,
        _equal,
        ("out",),
    ),
    "dequantize_codes_add_int4": Kernel(
        _quant4,
        lambda i: K.dequantize_codes_add(i["codes"], i["scales"], 4, QUANT_BLOCK, i["out"], alpha=0.5),
        lambda i: K.dequantize_codes_add_ref(i["codes"], i["scales"], 4, QUANT_BLOCK, i["out"], alpha=0.5),
        lambda n: n // 2 + _scales_bytes(n, QUANT_BLOCK) + 8 * n,
        _close,
        ("out",),
    ),
    "pack_int4": Kernel(
        _quant4, lambda i: K.pack_int4(i["q"]), lambda i: K.pack_int4_ref(i["q"]), lambda n: n + n // 2, _equal
    ),
    "unpack_int4": Kernel(
        _quant4,
        lambda i: K.unpack_int4(i["codes"]),
        lambda i: K.unpack_int4_ref(i["codes"]),
        lambda n: n // 2 + n,
        _equal,
    ),
    "topk_pack": Kernel(
        _topk_setup,
        lambda i: K.topk_pack(i["x"], i["k"]),
        lambda i: K.topk_pack_ref(i["x"], i["k"]),
        lambda n: 4 * n + 8 * max(1, int(n * TOPK_RATIO)),
        _topk,
    ),
    "topk_scatter_add": Kernel(
        _topk_setup,
        lambda i: K.topk_scatter_add(i["out"], i["payload"]),
        lambda i: K.topk_scatter_add_ref(i["out"], i["payload"]),
        # the payload is read, and each of its k values is read from and written to out
        lambda n: 16 * max(1, int(n * TOPK_RATIO)),
        _close,
        ("out",),
    ),
}


# -- experiments ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """One kernel at one size."""

    kernel: str
    """A key of :data:`KERNELS`."""
    numel: int
    """Values in the input (fp32)."""
    device: str
    """``cpu`` or ``cuda``."""
    repeats: int = 10
    """Timed calls (the median is reported), fewer when ``budget_s`` runs out first (at least 3)."""
    budget_s: float = 2.0
    """Seconds of timed calls per measurement."""
    check: bool = True
    """Compare the op with the reference before timing."""
    time_ref: bool = False
    """Also time the reference on the same tensors (meaningful where the op is not the reference)."""


@dataclass(frozen=True, kw_only=True)
class ExperimentResult:
    """One kernel's figures at one size; speeds are None when the correctness check failed."""

    config: ExperimentConfig
    backend: str
    """What the public op ran: ``triton`` or ``reference``."""
    failure: str = ""
    """Why the correctness check failed; empty when it passed."""
    ms: float | None = None
    """Median time of one call of the public op."""
    gbps: float | None = None
    """Bytes read + written over ``ms`` (GB/s, 1e9 bytes)."""
    copy_gbps: float | None = None
    """A same-run ``torch.clone`` of the fp32 input: 2 * 4 * numel bytes over its median time."""
    x_copy: float | None = None
    """``gbps / copy_gbps``: the fraction of the memory-bandwidth roof reached."""
    ref_ms: float | None = None
    """Median time of the reference on the same tensors (``time_ref`` only)."""
    x_ref: float | None = None
    """``ref_ms / ms``: the speed-up over the reference."""


def get_configs(
    kernels: Sequence[str], sizes: Sequence[int], device: str, repeats: int = 10, budget_s: float = 2.0
) -> list[ExperimentConfig]:
    """Every kernel at every size; the reference is timed too when the op would not run it."""
    time_ref = K.backend(device) != "reference"
    return [
        ExperimentConfig(
            kernel=k,
            numel=n,
            device=device,
            repeats=repeats,
            budget_s=budget_s,
            time_ref=time_ref,
            check=time_ref or n == min(sizes),
        )
        for n in sizes
        for k in kernels
    ]


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fns: Sequence[Callable[[], Any]], device: torch.device, repeats: int, budget_s: float) -> list[float]:
    """Median wall-clock milliseconds of each of ``fns``, called in turn so that load drift hits all alike.

    Each is called once untimed first (compilation, first-touch pages).
    """
    for fn in fns:
        fn()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    spent = 0.0
    while len(times[0]) < repeats and (len(times[0]) < 3 or spent < budget_s):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts.append(time.perf_counter() - t0)
            spent += ts[-1]
    return [1e3 * statistics.median(ts) for ts in times]


def _copy_inputs(inputs: Inputs, keys: Sequence[str]) -> Inputs:
    """``inputs`` with the tensors under ``keys`` cloned (the others shared)."""
    return {k: (v.clone() if k in keys else v) for k, v in inputs.items()}


def run_experiment(config: ExperimentConfig, inputs: Inputs | None = None) -> ExperimentResult:
    """Check, then time one kernel at one size, with the copy (and the reference) interleaved with it."""
    device = torch.device(config.device)
    spec = KERNELS[config.kernel]
    inputs = inputs if inputs is not None else spec.setup(config.numel, device)
    backend = K.backend(device)
    if config.check:
        try:
            spec.check(
                spec.op(_copy_inputs(inputs, spec.mutates)), spec.ref(_copy_inputs(inputs, spec.mutates)), inputs
            )
        except AssertionError as exc:
            return ExperimentResult(config=config, backend=backend, failure=str(exc).splitlines()[0])
    x = inputs["x"]
    fns = [lambda: spec.op(inputs), lambda: torch.clone(x)]
    if config.time_ref:
        fns.append(lambda: spec.ref(inputs))
    ms, copy_ms, *ref = time_ms(fns, device, config.repeats, config.budget_s)
    gbps = spec.bytes_moved(config.numel) / ms / 1e6
    copy_gbps = 2 * x.numel() * x.element_size() / copy_ms / 1e6
    ref_ms = ref[0] if ref else None
    return ExperimentResult(
        config=config,
        backend=backend,
        ms=ms,
        gbps=gbps,
        copy_gbps=copy_gbps,
        x_copy=gbps / copy_gbps,
        ref_ms=ref_ms,
        x_ref=ref_ms / ms if ref_ms is not None else None,
    )


def run_all(configs: Sequence[ExperimentConfig]) -> list[ExperimentResult]:
    """Run ``configs`` size by size; inputs are built once per size and kind of kernel."""
    results: list[ExperimentResult] = []
    for n in sorted({c.numel for c in configs}):
        cache: dict[Callable[..., Inputs], Inputs] = {}
        for config in [c for c in configs if c.numel == n]:
            spec = KERNELS[config.kernel]
            if spec.setup not in cache:
                cache.clear()  # one kind's inputs at a time: at 256M values each tensor is 1 GiB
                cache[spec.setup] = spec.setup(n, torch.device(config.device))
            results.append(run_experiment(config, cache[spec.setup]))
            logger.info("%s", format_row(results[-1]))
    return results


# -- report --------------------------------------------------------------------------------


def _size(n: int) -> str:
    """``16M`` for 16 * 2**20."""
    return f"{n // MiB}M" if n % MiB == 0 else str(n)


def parse_size(text: str) -> int:
    """``16M`` -> 16 * 2**20; plain integers as they are."""
    text = text.strip().upper()
    return int(text[:-1]) * MiB if text.endswith("M") else int(text)


def _meets(r: ExperimentResult) -> str:
    """``yes``/``no`` against the target of the backend that ran (Triton on GPU, reference on CPU)."""
    if r.failure:
        return "FAILED"
    if r.backend == "triton":
        ok = r.x_copy >= TARGET_GPU_COPY and (r.x_ref or 0) >= TARGET_GPU_SPEEDUP
    else:
        ok = r.x_copy >= TARGET_CPU_COPY
    return "yes" if ok else "no"


COLUMNS = ("kernel", "values", "backend", "ms", "GB/s", "copy GB/s", "x copy", "ref ms", "x ref", "target met")


def _cells(r: ExperimentResult) -> list[str]:
    """One result's row of the table."""
    c = r.config
    if r.failure:
        return [c.kernel, _size(c.numel), r.backend, f"failed: {r.failure}", "", "", "", "", "", "FAILED"]
    ref = [f"{r.ref_ms:.3f}", f"{r.x_ref:.1f}x"] if r.ref_ms is not None else ["-", "-"]
    return [
        c.kernel,
        _size(c.numel),
        r.backend,
        f"{r.ms:.3f}",
        f"{r.gbps:.1f}",
        f"{r.copy_gbps:.1f}",
        f"{r.x_copy:.2f}",
        *ref,
        _meets(r),
    ]


def format_row(r: ExperimentResult) -> str:
    """One markdown table row."""
    return common.markdown_row(_cells(r))


def format_table(results: Sequence[ExperimentResult]) -> str:
    """A markdown table, kernels grouped together, sizes ascending."""
    order = {k: i for i, k in enumerate(KERNELS)}
    rows = sorted(results, key=lambda r: (order[r.config.kernel], r.config.numel))
    return common.markdown_table(COLUMNS, map(_cells, rows))


def describe_machine(device: str) -> str:
    """One line: the device, torch, Triton, and the backend the public ops used."""
    if device == "cuda":
        what = torch.cuda.get_device_name()
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        what = f"{platform.processor() or platform.machine()}, {cores} cores, {torch.get_num_threads()} torch threads"
    info = K.kernel_info()
    return f"{device}: {what}; torch {torch.__version__}; triton {info['triton']}; public ops: {info[device]}"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = common.make_parser(__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--sizes",
        default=None,
        help="comma-separated value counts, e.g. 1M,16M "
        "(default: 1M,4M,16M,64M,256M on CUDA; 1M,4M,16M,64M on CPU, to stay within a few minutes)",
    )
    p.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated kernels to run")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (median reported)")
    p.add_argument(
        "--budget", type=float, default=2.0, help="seconds of timed calls per measurement (at least 3 calls)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    common.add_output_args(p)
    return common.parse_args(p, argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run, print the table; exit status 1 if any correctness check failed."""
    args = _parse_args(argv)
    common.log_to_console()
    if args.threads:
        torch.set_num_threads(args.threads)
    default_sizes = "1M,4M,16M,64M,256M" if args.device == "cuda" else "1M,4M,16M,64M"
    sizes = [parse_size(s) for s in (args.sizes or default_sizes).split(",") if s.strip()]
    names = [k.strip() for k in args.kernels.split(",") if k.strip()]
    unknown = set(names) - set(KERNELS)
    if unknown:
        raise SystemExit(f"unknown kernels {sorted(unknown)}; available: {', '.join(KERNELS)}")
    bad = [n for n in sizes if n % SIGN_BLOCK]
    if bad:
        raise SystemExit(f"sizes must be multiples of {SIGN_BLOCK} (the sign block), got {bad}")
    results = run_all(get_configs(names, sizes, args.device, args.repeats, args.budget))
    device, table = describe_machine(args.device), format_table(results)
    print(f"\n{device}\n")
    print(table)
    common.write_results(
        args,
        f"kernels-{args.device}",
        title=f"Kernels on {args.device}",
        command=common.command_line(__file__, argv),
        report=f"{device}\n\n{table}",
        figures={"device": device, "results": [asdict(r) for r in results]},
    )
    return 1 if any(r.failure for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
