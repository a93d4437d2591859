"""``none``: DDP's exact all-reduce, through the hook. The control every other compressor is measured against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distcomp.bucket import Bucket
from distcomp.collectives import exact_mean
from distcomp.comm import Comm
from distcomp.compressor import Compressor, CompressorConfig
from distcomp.registry import register_compressor


@register_compressor("none")
class NoCompression(Compressor):
    """Average in the bucket's own dtype, dividing first like DDP's default hook (bit-identical to it)."""

    @dataclass(kw_only=True, frozen=True)
    class Config(CompressorConfig):
        """``none`` has no options beyond ``start_step``."""

    def compress(self, bucket: Bucket, comm: Comm, step: int) -> torch.Tensor:
        return exact_mean(bucket.buffer, comm)
