"""Pack/unpack kernels behind the compressors (installed as ``distcomp.kernels``).

Every public op validates its input and runs the pure-torch reference
(``*_ref``), which is exact, works on any device and is the CPU path. GPU
kernels slot in behind the same public functions.
"""

from distcomp.kernels.quant import (
    dequantize_blockwise,
    dequantize_blockwise_ref,
    pack_int4,
    pack_int4_ref,
    quantize_blockwise,
    quantize_blockwise_ref,
    unpack_int4,
    unpack_int4_ref,
)
from distcomp.kernels.sign import (
    pack_signs,
    pack_signs_ref,
    sign_decode,
    sign_decode_ref,
    sign_encode,
    sign_encode_ref,
    unpack_signs,
    unpack_signs_ref,
)
from distcomp.kernels.topk import topk_pack, topk_pack_ref, topk_scatter_add, topk_scatter_add_ref

__all__ = [
    "dequantize_blockwise",
    "dequantize_blockwise_ref",
    "pack_int4",
    "pack_int4_ref",
    "pack_signs",
    "pack_signs_ref",
    "quantize_blockwise",
    "quantize_blockwise_ref",
    "sign_decode",
    "sign_decode_ref",
    "sign_encode",
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
