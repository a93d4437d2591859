"""The methods ``distcomp bench`` compares, and how each one is built on a rank.

A method is one way to average gradients: plain DDP, torch's ``noop_hook``
(sends nothing: the no-communication bound), torch's own ``powerSGD_hook``,
each distcomp compressor as a DDP comm hook, or a distcomp compressed optimizer
registered on DDP. Every method trains its own replica of the same model from
the same initial weights on the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

Kind = Literal["ddp", "noop", "torch_powersgd", "hook", "optimizer", "fsdp"]

POWERSGD_RANK = 4
"""The rank of both PowerSGDs (distcomp's and torch's), so that they send the same factors."""
SPARSE_RATIO = 0.01


@dataclass(frozen=True, kw_only=True)
class Method:
    """One way to average gradients."""

    name: str
    """Unique within a run; what tables, plots and ``--methods`` call it."""
    kind: Kind
    compressor: str | None = None
    """The distcomp compressor (``kind="hook"``; with ``kind="fsdp"``, of the reduce-scatter, None: plain FSDP2)
    or optimizer class name (``kind="optimizer"``)."""
    options: tuple[tuple[str, Any], ...] = ()
    """Compressor or optimizer options as ``(key, value)`` pairs."""
    dense: bool = False
    """Sends a dense (fp32 or half-size) or 4-8 bit gradient: left out of slow links by default."""

    @property
    def label(self) -> str:
        """How a table row names it, with its options."""
        opts = " ".join(f"{k}={v}" for k, v in self.options if k not in _HIDDEN_OPTIONS)
        return f"{self.name} ({opts})" if opts else self.name


_HIDDEN_OPTIONS = ("freeze_step", "var_freeze_step", "lr")

_OPTIMIZERS = {"onebit-adam": "OneBitAdam", "zero-one-adam": "ZeroOneAdam", "onebit-lamb": "OneBitLamb"}


def all_methods(warmup: int) -> list[Method]:
    """Every method, in table order; the compressed optimizers leave their exact warm-up after ``warmup`` steps."""
    hooks = [
        Method(name="none", kind="hook", compressor="none", dense=True),
        Method(name="fp16", kind="hook", compressor="fp16", dense=True),
        Method(name="bf16", kind="hook", compressor="bf16", dense=True),
        Method(name="powersgd", kind="hook", compressor="powersgd", options=(("rank", POWERSGD_RANK),)),
        Method(name="topk", kind="hook", compressor="topk", options=(("ratio", SPARSE_RATIO),)),
        Method(name="randomk", kind="hook", compressor="randomk", options=(("ratio", SPARSE_RATIO),)),
        Method(name="sign", kind="hook", compressor="sign"),
        Method(name="int8", kind="hook", compressor="int8", dense=True),
        Method(name="int4", kind="hook", compressor="int4", dense=True),
    ]
    freeze = {"OneBitAdam": "freeze_step", "OneBitLamb": "freeze_step", "ZeroOneAdam": "var_freeze_step"}
    optimizers = [
        Method(name=name, kind="optimizer", compressor=cls, options=((freeze[cls], warmup),))
        for name, cls in _OPTIMIZERS.items()
    ]
    # FSDP2 all-gathers the parameters in fp32 twice a step whatever compresses its reduce-scatter: dense.
    fsdp = [
        Method(name="fsdp", kind="fsdp", dense=True),
        Method(name="fsdp-sign", kind="fsdp", compressor="sign", dense=True),
    ]
    return [
        Method(name="ddp", kind="ddp", dense=True),
        Method(name="noop", kind="noop"),
        Method(name="torch-powersgd", kind="torch_powersgd", options=(("rank", POWERSGD_RANK),)),
        *hooks,
        *optimizers,
        *fsdp,
    ]


QUICK_METHODS = ("ddp", "noop", "torch-powersgd", "powersgd", "topk", "sign", "int8", "onebit-adam")
"""What ``--quick`` runs: the baselines and one method of each family."""


def select(names: Sequence[str] | None, warmup: int) -> list[Method]:
    """The methods named (all when ``names`` is None), in table order; unknown names raise, listing the known."""
    methods = all_methods(warmup)
    if names is None:
        return methods
    known = {m.name: m for m in methods}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(known)}")
    return [m for m in methods if m.name in set(names)]


MODELS = {"gpt": {}, "smoke": {"d_model": 64, "n_layer": 2, "n_head": 2, "context": 64}}
"""The benchmark's models as ``GPTConfig`` fields: the 10.9M byte-level GPT, and a 0.1M one that checks a
setup in seconds (``distcomp bench --smoke``)."""


def model_config(name: str) -> Any:
    """The ``GPTConfig`` of benchmark model ``name``."""
    from distcomp.models.gpt import GPTConfig

    return GPTConfig(**MODELS[name])


# -- building a replica inside a rank ------------------------------------------------------


@dataclass
class Replica:
    """One method's model, DDP wrapper, optimizer and what reports its telemetry, inside one rank."""

    method: Method
    model: nn.Module
    ddp: nn.Module
    """What a step calls: the DDP wrapper, or the FSDP2 model itself."""
    optimizer: torch.optim.Optimizer
    telemetry: Any = None
    """What has ``stats()`` (a compression state or a distcomp optimizer); None for the torch methods."""
    closers: list[Any] = field(default_factory=list)

    def close(self) -> None:
        """Stop worker threads and release process groups."""
        for c in self.closers:
            c.close()

    def step_stats(self) -> dict[str, float]:
        """This step's distcomp telemetry (bytes sent, codec and communication seconds); empty for torch's."""
        if self.telemetry is None:
            return {}
        s = self.telemetry.stats()["step"]
        return {k: float(s.get(k, 0.0)) for k in ("sent_bytes", "codec_s", "comm_s", "exposed_comm_s")}


def build(method: Method, model: nn.Module, *, lr: float, bucket_cap_mb: float) -> Replica:
    """``method`` on ``model`` (already on its device, same initial weights on every rank)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import distcomp
    import distcomp.optim

    if method.kind == "fsdp":
        return _build_fsdp(method, model, lr)
    # torch's powerSGD_hook gets one bucket: with several it hangs on gloo.
    cap = 1024.0 if method.kind == "torch_powersgd" else bucket_cap_mb
    ddp = DDP(model, bucket_cap_mb=cap, init_sync=False)
    options = dict(method.options)
    if method.kind == "optimizer":
        opt = getattr(distcomp.optim, str(method.compressor))(model.parameters(), lr=lr, **options)
        return Replica(method, model, ddp, opt, opt, [distcomp.optim.register(ddp, opt)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    replica = Replica(method, model, ddp, optimizer)
    if method.kind == "noop":
        from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook

        ddp.register_comm_hook(None, noop_hook)
    elif method.kind == "torch_powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

        torch_state = psgd.PowerSGDState(None, matrix_approximation_rank=options["rank"], start_powerSGD_iter=2)
        ddp.register_comm_hook(torch_state, psgd.powerSGD_hook)
    elif method.kind == "hook":
        state = distcomp.register(ddp, str(method.compressor), **options)
        replica.telemetry = state
        replica.closers.append(state)
    return replica


def _build_fsdp(method: Method, model: nn.Module, lr: float) -> Replica:
    """FSDP2, one unit per transformer block and the root; its reduce-scatter compressed when asked."""
    from torch.distributed.fsdp import fully_shard

    import distcomp.fsdp

    for block in model.blocks:  # type: ignore[union-attr]
        fully_shard(block)
    fully_shard(model)
    replica = Replica(method, model, model, torch.optim.AdamW(model.parameters(), lr=lr))
    if method.compressor is not None:
        state = distcomp.fsdp.register(model, method.compressor, **dict(method.options))
        replica.telemetry = state
        replica.closers.append(state)
    return replica
