"""``fp16`` and ``bf16``: send the gradients in half precision.

Unlike torch's ``bf16_compress_hook`` these work on gloo as well as NCCL. The
division by the world size happens before the cast, so that the sum cannot
overflow fp16's range where the mean would not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from distcomp.bucket import Bucket
from distcomp.codecs import CastCodec
from distcomp.comm import Comm
from distcomp.compressor import Compressor, CompressorConfig
from distcomp.numerics import local_health
from distcomp.registry import register_compressor
from distcomp.workspace import Workspace


class _Cast(Compressor):
    wire_dtype: ClassVar[torch.dtype]

    def __init__(self, config: CompressorConfig | None = None) -> None:
        super().__init__(config)
        self.ws = Workspace()

    def compress(self, bucket: Bucket, comm: Comm, step: int) -> torch.Tensor:
        buf = bucket.buffer.div_(comm.world_size)
        codec, wire = CastCodec(self.wire_dtype), buf
        if buf.dtype != self.wire_dtype:
            wire = codec.encode(buf, out=self.ws.get("wire", buf.numel(), self.wire_dtype, buf.device))
        comm.all_reduce(wire)
        if wire is not buf:
            codec.decode(wire, out=buf)
        comm.record.nonfinite = bool(local_health(buf).isnan())
        return buf


@register_compressor("fp16")
class Fp16Compression(_Cast):
    """Gradients cast to float16 for the all-reduce (2x fewer bytes than fp32)."""

    wire_dtype = torch.float16

    @dataclass(kw_only=True, frozen=True)
    class Config(CompressorConfig):
        """``fp16`` has no options beyond ``start_step``."""


@register_compressor("bf16")
class Bf16Compression(_Cast):
    """Gradients cast to bfloat16 for the all-reduce (fp32's range, 2x fewer bytes)."""

    wire_dtype = torch.bfloat16

    @dataclass(kw_only=True, frozen=True)
    class Config(CompressorConfig):
        """``bf16`` has no options beyond ``start_step``."""
