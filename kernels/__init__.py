"""Pack/unpack kernels behind the compressors (installed as ``distcomp.kernels``).

Every public op validates its input and runs a Triton kernel on CUDA tensors
(``*_triton`` launchers in the ``*_triton`` modules, imported only then) and
the pure-torch reference (``*_ref``) everywhere else; :func:`backend` and
:func:`kernel_info` say which, and why. ``import distcomp`` never imports Triton.
"""

from distcomp.kernels._backend import backend, backend_reason, kernel_info
from distcomp.kernels.quant import (
    dequantize_blockwise,
    dequantize_blockwise_ref,
    dequantize_codes,
    dequantize_codes_add,
    dequantize_codes_add_ref,
    dequantize_codes_ref,
    pack_int4,
    pack_int4_ref,
    quantize_blockwise,
    quantize_blockwise_ref,
    quantize_codes,
    quantize_codes_ef,
    quantize_codes_ef_ref,
    quantize_codes_ref,
    unpack_int4,
    unpack_int4_ref,
)
from distcomp.kernels.sign import (
    pack_signs,
    pack_signs_ref,
    sign_decode,
    sign_decode_add,
    sign_decode_add_ref,
    sign_decode_ref,
    sign_encode,
    sign_encode_ef,
    sign_encode_ef_ref,
    sign_encode_ref,
    unpack_signs,
    unpack_signs_ref,
)
from distcomp.kernels.topk import topk_pack, topk_pack_ref, topk_scatter_add, topk_scatter_add_ref

__all__ = [
    "backend",
    "backend_reason",
    "dequantize_blockwise",
    "dequantize_blockwise_ref",
    "dequantize_codes",
    "dequantize_codes_add",
    "dequantize_codes_add_ref",
    "dequantize_codes_ref",
    "kernel_info",
    "pack_int4",
    "pack_int4_ref",
    "pack_signs",
    "pack_signs_ref",
    "quantize_blockwise",
    "quantize_blockwise_ref",
    "quantize_codes",
    "quantize_codes_ef",
    "quantize_codes_ef_ref",
    "quantize_codes_ref",
    "sign_decode",
    "sign_decode_add",
    "sign_decode_add_ref",
    "sign_decode_ref",
    "sign_encode",
    "sign_encode_ef",
    "sign_encode_ef_ref",
    "sign_encode_ref",
    "topk_pack",
    "topk_pack_ref",
    "topk_scatter_add",
    "topk_scatter_add_ref",
    "unpack_int4",
    "unpack_int4_ref",
    "unpack_signs",
    "unpack_signs_ref",
]
