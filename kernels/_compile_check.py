"""Compile every Triton kernel ahead of time for a GPU, on a machine without one.

The interpreter (``TRITON_INTERPRET=1``) runs the kernels' logic on CPU tensors
but skips the compiler: type, shape and layout errors that only the GPU
compiler sees would first show on a GPU. This compiles each kernel, in the
specializations its launcher uses, down to a cubin for the given CUDA
architecture (Triton ships ``ptxas``), so CI without a GPU catches them too::

    python -m distcomp.kernels._compile_check --arch 90   # H100/H200; 80 for A100

It must run without ``TRITON_INTERPRET`` (which turns ``@triton.jit`` into the interpreter).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

FLOATS = ("fp32", "fp16", "bf16")


def _variants() -> Iterator[tuple[str, Any, dict[str, str], dict[str, Any]]]:
    """``(label, kernel, signature, constexprs)`` for every specialization the launchers launch."""
    from distcomp.kernels import quant_triton as q
    from distcomp.kernels import sign_triton as s
    from distcomp.kernels import topk_triton as t

    i32, p = "i32", lambda ty: f"*{ty}"
    for f in FLOATS:
        yield (
            f"pack_signs[{f}]",
            s._pack_signs_kernel,
            {"x_ptr": p(f), "bits_ptr": "*u8", "n": i32, "nbytes": i32, "BYTES": "constexpr"},
            {"BYTES": 512},
        )
        yield (
            f"unpack_signs[{f}]",
            s._unpack_signs_kernel,
            {"bits_ptr": "*u8", "out_ptr": p(f), "numel": i32, "nbytes": i32, "BYTES": "constexpr"},
            {"BYTES": 512},
        )
        for ef in (False, True):
            for one_tile, group, tile_bytes in ((True, 2, 256), (False, 1, 1024)):
                sig = {
                    "x_ptr": p(f),
                    "res_ptr": "*fp32" if ef else p(f),
                    "res_out_ptr": "*fp32" if ef else p(f),
                    "bits_ptr": "*u8",
                    "scales_ptr": "*fp32",
                    "nblocks": i32,
                    "block": i32,
                    "num_tiles": i32,
                    "row_blocks": i32,
                    "bits_stride": i32,
                    "scales_stride": i32,
                    "GROUP": "constexpr",
                    "TILE_BYTES": "constexpr",
                    "EF": "constexpr",
                    "ONE_TILE": "constexpr",
                }
                yield (
                    f"sign_encode[{f}, ef={ef}, one_tile={one_tile}]",
                    s._sign_encode_kernel,
                    sig,
                    {"GROUP": group, "TILE_BYTES": tile_bytes, "EF": ef, "ONE_TILE": one_tile},
                )
        for bits in (8, 4):
            for stochastic in (False, True):
                # The fused error feedback only adds fp32 loads and stores: one input dtype covers it.
                for ef in (False, True) if f == "fp32" else (False,):
                    for one_tile, group, pairs in ((True, 16, 128), (False, 1, 4096)):
                        sig = {
                            "x_ptr": p(f),
                            "res_ptr": "*fp32" if ef else p(f),
                            "res_out_ptr": "*fp32" if ef else p(f),
                            "q_ptr": "*i8" if bits == 8 else "*u8",
                            "scales_ptr": "*fp32",
                            "seed_ptr": "*i64" if stochastic else "*fp32",
                            "nblocks": i32,
                            "block": i32,
                            "num_tiles": i32,
                            "row_blocks": i32,
                            "q_stride": i32,
                            "scales_stride": i32,
                            "QMAX": "constexpr",
                            "GROUP": "constexpr",
                            "TILE_PAIRS": "constexpr",
                            "STOCHASTIC": "constexpr",
                            "PACKED": "constexpr",
                            "ONE_TILE": "constexpr",
                            "EF": "constexpr",
                        }
                        yield (
                            f"quantize[{f}, int{bits}, stochastic={stochastic}, ef={ef}, one_tile={one_tile}]",
                            q._quantize_kernel,
                            sig,
                            {
                                "QMAX": q.QMAX[bits],
                                "GROUP": group,
                                "TILE_PAIRS": pairs,
                                "STOCHASTIC": stochastic,
                                "PACKED": bits == 4,
                                "ONE_TILE": one_tile,
                                "EF": ef,
                            },
                        )
        yield (
            f"topk_select[{f}]",
            t._select_kernel,
            {
                "x_ptr": p(f),
                "threshold_ptr": "*fp32",
                "cand_ptr": "*i64",
                "count_ptr": "*i32",
                "n": i32,
                "capacity": i32,
                "BLOCK": "constexpr",
            },
            {"BLOCK": t.SELECT_BLOCK},
        )
        yield (
            f"topk_pack[{f}]",
            t._topk_pack_kernel,
            {"x_ptr": p(f), "idx_ptr": "*i64", "payload_ptr": "*i32", "k": i32, "BLOCK": "constexpr"},
            {"BLOCK": t.PACK_BLOCK},
        )
    for acc in (False, True):
        sig = {
            "bits_ptr": "*u8",
            "bits_stride": i32,
            "scales_ptr": "*fp32",
            "scales_stride": i32,
            "out_ptr": "*fp32",
            "sum_rows": i32,
            "row_bytes": i32,
            "block": i32,
            "alpha": "fp32",
            "BYTES": "constexpr",
            "ACCUMULATE": "constexpr",
        }
        yield f"sign_decode[accumulate={acc}]", s._sign_decode_kernel, sig, {"BYTES": 512, "ACCUMULATE": acc}
        for bits in (8, 4):
            sig = {
                "q_ptr": "*i8" if bits == 8 else "*u8",
                "q_stride": i32,
                "scales_ptr": "*fp32",
                "scales_stride": i32,
                "out_ptr": "*fp32",
                "sum_rows": i32,
                "row_len": i32,
                "block": i32,
                "alpha": "fp32",
                "PAIRS": "constexpr",
                "BITS": "constexpr",
                "ACCUMULATE": "constexpr",
            }
            yield (
                f"dequantize[int{bits}, accumulate={acc}]",
                q._dequantize_kernel,
                sig,
                {"PAIRS": 2048, "BITS": bits, "ACCUMULATE": acc},
            )
    yield (
        "pack_int4",
        q._pack_int4_kernel,
        {"q_ptr": "*i8", "out_ptr": "*u8", "npairs": i32, "PAIRS": "constexpr"},
        {"PAIRS": 4096},
    )
    yield (
        "unpack_int4",
        q._unpack_int4_kernel,
        {"packed_ptr": "*u8", "out_ptr": "*i8", "nbytes": i32, "PAIRS": "constexpr"},
        {"PAIRS": 4096},
    )
    yield (
        "topk_scatter_add",
        t._scatter_add_kernel,
        {"out_ptr": "*fp32", "payload_ptr": "*i32", "n": i32, "k": i32, "row_stride": i32, "BLOCK": "constexpr"},
        {"BLOCK": t.PACK_BLOCK},
    )


def compile_all(arch: int = 90, only: str = "") -> list[str]:
    """Compile every kernel variant (whose label contains ``only``) to a cubin for ``sm_<arch>``; returns the labels.

    Raises ``RuntimeError`` naming the variant that failed.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels that this compiles")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    done = []
    for label, kernel, signature, constexprs in _variants():
        if only not in label:
            continue
        try:
            triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target)
        except Exception as exc:  # noqa: BLE001 - report which variant, then fail
            raise RuntimeError(f"{label} does not compile for sm_{arch}: {type(exc).__name__}: {exc}") from exc
        done.append(label)
    return done


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: compile all variants, print one line each, exit 1 on the first failure."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100/H200, 80: A100)")
    p.add_argument("--only", default="", help="compile only variants whose label contains this")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        labels = compile_all(args.arch, args.only)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{len(labels)} kernel variants compile for sm_{args.arch} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
