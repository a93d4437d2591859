"""Single-process checks of the framework glue and of single-file compression checkpoints.

A 1-rank gloo group (the ``pg1`` fixture) gives real DDP models; the 2-process
runs of the same paths are in test_examples.py and tests/distributed/test_ddp.py.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import distcomp
from distcomp.errors import CheckpointError, ConfigError
from distcomp.integrations import compress, unwrap_optimizer

LOST = "the optimizer was resumed from a checkpoint but the powersgd compression state was not"


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))


def train_step(ddp: DDP, opt: torch.optim.Optimizer) -> None:
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    ddp(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def resumed_run(saved: dict, compressor: str, restore: bool) -> list[str]:
    """A new DDP and optimizer from ``saved``; the warnings of its first step."""
    ddp = DDP(model())
    distcomp.register(ddp, compressor, **({"rank": 2} if compressor == "powersgd" else {}))
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    opt.load_state_dict(saved["optimizer"])
    if restore:
        assert distcomp.load_state_dict(ddp, saved["compression"])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        train_step(ddp, opt)
        train_step(ddp, opt)
    return [str(w.message) for w in seen]


def saved_run(compressor: str) -> dict:
    ddp = DDP(model())
    distcomp.register(ddp, compressor, **({"rank": 2} if compressor == "powersgd" else {}))
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    for _ in range(3):
        train_step(ddp, opt)
    return {"optimizer": opt.state_dict(), "compression": distcomp.state_dict(ddp)}


def test_resumed_without_compression_state_is_warned_once(pg1: None) -> None:
    saved = saved_run("powersgd")
    assert sum(LOST in w for w in resumed_run(saved, "powersgd", restore=False)) == 1
    assert not any(LOST in w for w in resumed_run(saved, "powersgd", restore=True))


def test_stateless_compressor_is_not_warned(pg1: None) -> None:
    warned = resumed_run(saved_run("fp16"), "fp16", restore=False)
    assert not any("compression state was not" in w for w in warned)


def test_gathered_state_of_another_world_size(pg1: None) -> None:
    ddp = DDP(model())
    distcomp.register(ddp, "powersgd", rank=2)
    blob = distcomp.state_dict(ddp)
    assert blob["world_size"] == 1 and blob["ranks"][0]["rank"] == 0
    other = {**blob, "world_size": 2, "ranks": [blob["ranks"][0], None]}
    with pytest.raises(CheckpointError, match="job of 2 ranks, this one has 1.*same world size"):
        distcomp.load_state_dict(ddp, other)
    with pytest.warns(UserWarning, match="compression state not restored, it restarts from scratch"):
        assert distcomp.load_state_dict(ddp, other, strict=False) is False


def test_state_dict_of_a_model_without_compression(pg1: None) -> None:
    with pytest.raises(ValueError, match="no distcomp compression is registered on this DistributedDataParallel"):
        distcomp.state_dict(DDP(model()))


def test_compress_picks_and_refuses(pg1: None) -> None:
    ddp = DDP(model())
    one_bit = distcomp.optim.OneBitAdam(ddp.parameters(), lr=1e-3, freeze_step=2)
    with pytest.raises(ConfigError, match="both a gradient compressor.*drop the compressor"):
        compress(ddp, "powersgd", [one_bit])
    with pytest.raises(ConfigError, match="no compressor"):
        compress(ddp, None, [torch.optim.SGD(ddp.parameters(), lr=0.1)])
    assert compress(model(), "powersgd") is None  # one process, no wrapper: nothing to compress
    (state,) = compress(ddp, None, [one_bit])
    assert one_bit.reset_errors_from_other_ranks and state.optimizer is one_bit


def test_unwrap_lightning_optimizer() -> None:
    from lightning.pytorch.core.optimizer import LightningOptimizer

    inner = torch.optim.SGD(model().parameters(), lr=0.1)
    assert unwrap_optimizer(LightningOptimizer(inner)) is inner and unwrap_optimizer(inner) is inner


def test_accelerate_comm_hook_it_would_ignore_is_warned() -> None:
    from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs

    from distcomp.integrations.accelerate import register

    ignored = types.SimpleNamespace(ddp_handler=DistributedDataParallelKwargs(comm_hook="powersgd"))
    with pytest.warns(UserWarning, match=r"comm_hook='powersgd'\) is ignored by Accelerate"):
        assert register(ignored, model(), "powersgd") is None
    taken = types.SimpleNamespace(ddp_handler=DistributedDataParallelKwargs(comm_hook=DDPCommunicationHookType.FP16))
    with pytest.raises(ValueError, match="already registered torch's .* drop comm_hook"):
        register(taken, model(), "powersgd")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert register(types.SimpleNamespace(ddp_handler=None), model(), "powersgd") is None
