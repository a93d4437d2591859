"""Compressed optimizers: 1-bit Adam, 0/1 Adam and 1-bit LAMB as standard torch optimizers.

    opt = distcomp.optim.OneBitAdam(model.parameters(), lr=1e-3, freeze_step=400)
    distcomp.optim.register(ddp_model, opt)          # with DDP: one line, nothing sent twice
    opt = distcomp.optim.from_deepspeed_config("ds_config.json", model.parameters())

They run on any torch.distributed backend (gloo, NCCL, ...), with or without
DDP, with fp32/fp16/bf16 parameters, parameter groups and AMP's GradScaler, and
their per-rank checkpoints resume bit for bit.
"""

from distcomp.optim.adam import OneBitAdam
from distcomp.optim.base import CompressedOptimizer
from distcomp.optim.ddp import OptimizerHookState, optimizer_hook, register
from distcomp.optim.deepspeed import from_deepspeed_config
from distcomp.optim.lamb import OneBitLamb
from distcomp.optim.zoadam import ZeroOneAdam

__all__ = [
    "CompressedOptimizer",
    "OneBitAdam",
    "OneBitLamb",
    "OptimizerHookState",
    "ZeroOneAdam",
    "from_deepspeed_config",
    "optimizer_hook",
    "register",
]
