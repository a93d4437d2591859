"""distcomp: compress what data-parallel PyTorch ranks send each other.

state = distcomp.register(ddp_model, "powersgd", rank=4)    # DDP
state = distcomp.fsdp.register(fsdp_model, "int8")          # FSDP2; HSDP: replicate_group=...
opt = distcomp.optim.OneBitAdam(model.parameters(), lr=1e-3, freeze_step=400)   # 1-bit Adam, 0/1 Adam, 1-bit LAMB
ckpt["compression"] = distcomp.state_dict(ddp_model)        # every rank, for the single file rank 0 saves
"""

from distcomp import compressors as _compressors  # noqa: F401 - registers the built-in compressors

# distcomp.optim.OneBitAdam right after `import distcomp`, as torch.optim.AdamW after `import torch`.
from distcomp import fsdp, optim
from distcomp.bucket import Bucket
from distcomp.checkpoint import load_state_dict, state_dict
from distcomp.compressor import Compressor, CompressorConfig
from distcomp.config import config_from_dict, config_to_dict, load_config
from distcomp.errors import CheckpointError, ConfigError, DistcompError, RankMismatchError
from distcomp.hooks.ddp import CompressionState, compressed_hook, ddp_comm_hook, register
from distcomp.registry import available_compressors, build_config, get_compressor, register_compressor

__version__ = "0.1.0"

__all__ = [
    "Bucket",
    "CheckpointError",
    "CompressionState",
    "Compressor",
    "CompressorConfig",
    "ConfigError",
    "DistcompError",
    "RankMismatchError",
    "available_compressors",
    "build_config",
    "compressed_hook",
    "config_from_dict",
    "config_to_dict",
    "fsdp",
    "optim",
    "ddp_comm_hook",
    "get_compressor",
    "load_config",
    "load_state_dict",
    "register",
    "register_compressor",
    "state_dict",
]
