"""Compression for FSDP2: a compressed gradient reduce-scatter, and HSDP's replica all-reduce.

from torch.distributed.fsdp import fully_shard
for block in model.blocks: fully_shard(block)
fully_shard(model)
state = distcomp.fsdp.register(model, "int8")

An FSDP1 ``FullyShardedDataParallel`` root goes to the same ``register`` (before its
first forward); :mod:`distcomp.fsdp.fsdp1` says what it supports.
"""

from distcomp.fsdp.fsdp1 import FSDP1CompressionState
from distcomp.fsdp.modules import fsdp_modules
from distcomp.fsdp.register import register
from distcomp.fsdp.state import FSDPCompressionState

__all__ = ["FSDP1CompressionState", "FSDPCompressionState", "fsdp_modules", "register"]
