"""HSDP with a compressed replica all-reduce: ``distcomp.fsdp.register(model, "powersgd", replicate_group=...)``.

HSDP reduces a gradient in two hops: a reduce-scatter inside each shard group
(fast, intra-node) and an all-reduce of the resulting shard across replicas (the
slow inter-node link). torch's native HSDP runs its own replica all-reduce before
``set_all_reduce_hook``, so the hook cannot replace it. The route used here:
``fully_shard`` on the *shard* sub-mesh of a (replicate, shard) mesh, and the
replica all-reduce done by distcomp in every FSDP module's all-reduce hook. With
a plain mean in the hook this gives parameters bit-identical to native HSDP;
with a compressor, the reduce-scatter stays exact and only the slow hop shrinks::

    mesh = init_device_mesh("cuda", (replicas, shard), mesh_dim_names=("replicate", "shard"))
    for block in model.blocks:
        fully_shard(block, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    state = distcomp.fsdp.register(model, "powersgd", replicate_group=mesh.get_group("replicate"), rank=4)

The hook receives the FSDP unit's reduce-scatter output: this rank's flat, padded
shard of every trainable parameter of the unit. It becomes a
:class:`~distcomp.bucket.Bucket` of named shards (a 2-D weight's shard is a
matrix, so PowerSGD applies), and the compressor averages it over the replica
group like a DDP bucket. Every replica decodes the same mean, so replicas stay
bit-identical.

Steps: FSDP calls the hook once per unit per backward that reduces gradients,
in the same order on every rank. A step ends at the last unit that reduces
anything, i.e. after as many calls as there are FSDP units with a trainable
parameter (counted at each step's first call, so freezing a whole unit later is
followed). Backwards that do not sync gradients
(``set_requires_gradient_sync(False)``) do not call the hook and are not steps;
``set_requires_all_reduce(False)`` has nothing to skip on this route. A unit
whose trainable parameters go unused breaks the count (it reduces less, or not
at all): that is an error naming the fix, ``set_reduce_scatter_unused_params(True)``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from distcomp.agreement import check_agreement
from distcomp.bucket import Bucket
from distcomp.comm import BucketRecord, Comm
from distcomp.compressor import Compressor
from distcomp.config import config_to_dict
from distcomp.errors import ConfigError
from distcomp.fsdp.modules import fsdp_modules, managed_parameters, module_names, padded_shard_numel
from distcomp.rankstate import check_rank_state
from distcomp.registry import make_compressor
from distcomp.telemetry import Telemetry

STATE_FORMAT = "distcomp.hsdp/1"
logger = logging.getLogger("distcomp")

__all__ = ["HSDPState", "register_hsdp"]


@dataclass(frozen=True)
class _Unit:
    """One FSDP module: its parameters by full name, and its position in the model."""

    index: int
    name: str
    params: tuple[tuple[str, nn.Parameter], ...]

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters FSDP reduces (a frozen one gets no gradient and no room in the shard)."""
        return [(n, p) for n, p in self.params if p.requires_grad]

    def buckets(self, output: torch.Tensor, shard_size: int) -> tuple[Bucket, Bucket | None]:
        """``output`` (the flat padded shard) as a bucket of named shards, and a compact copy if it has padding.

        FSDP pads every parameter's shard to ``ceil(dim0 / shard_size)`` rows; the
        padding belongs to no parameter, holds no gradient and must not reach a
        compressor, so a shard with padding is compressed from a compact copy.
        """
        names, shapes, offsets, pos = [], [], [], 0
        for name, param in self.trainable():
            names.append(name)
            shapes.append(_local_shape(param))
            offsets.append(pos)
            pos += padded_shard_numel(tuple(param.shape), shard_size)
        if pos != output.numel():
            raise RuntimeError(
                f"FSDP unit {self.name or '<root>'!r} reduced {output.numel()} gradient elements but its trainable "
                f"parameters take {pos}: some parameter got no gradient this step. Call "
                "module.set_reduce_scatter_unused_params(True) on the FSDP modules so that every trainable "
                "parameter is reduced (unused ones as zeros)"
            )
        padded = Bucket(output, tuple(names), tuple(shapes), tuple(offsets), self.index)
        if sum(s.numel() for s in shapes) == pos:
            return padded, None
        return padded, padded.subset(padded.names, index=self.index)


def _local_shape(param: torch.Tensor) -> torch.Size:
    """The unpadded shape of this rank's shard of an FSDP parameter (a DTensor)."""
    local = getattr(param, "to_local", None)
    return local().shape if local is not None else param.shape


class HSDPState:
    """The compressed replica all-reduce of an HSDP model: compressor, step counter, telemetry.

    Checkpointing: :meth:`state_dict` holds this rank's compressor state (residuals
    of this rank's shards, keyed by parameter names), the step, the config and the
    mesh it was made on; never a process group. Save one file per rank.
    """

    def __init__(
        self,
        compressor: Compressor,
        units: list[_Unit],
        *,
        replicate_group: dist.ProcessGroup,
        shard_size: int,
        log_every: int = 0,
    ) -> None:
        self.compressor = compressor
        self.units = units
        self.group = replicate_group
        self.shard_size = shard_size
        self.step = 0
        self.restored = False
        """Whether a checkpoint's state was loaded (a resumed run that did not is warned, see distcomp.checkpoint)."""
        self.telemetry = Telemetry(log_every=log_every)
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.replicas = dist.get_world_size(replicate_group)
        self._seen: set[int] = set()
        self._expected = 0

    @property
    def mesh(self) -> tuple[int, int]:
        """(replicas, shard size) of the layout this state compresses for."""
        return (self.replicas, self.shard_size)

    def on_reduce(self, unit: _Unit, output: torch.Tensor) -> None:
        """The all-reduce hook of one FSDP unit: replace ``output`` by its (compressed) mean over replicas."""
        if not self._seen:
            self._expected = sum(1 for u in self.units if u.trainable())
        elif unit.index in self._seen:
            raise RuntimeError(
                f"FSDP unit {unit.name or '<root>'!r} reduced twice in one step: the previous backward did not "
                f"reduce every unit with trainable parameters ({len(self._seen)} of {self._expected}). Every unit "
                "must reduce each step; call set_reduce_scatter_unused_params(True) for units that may go unused"
            )
        self._seen.add(unit.index)
        last = len(self._seen) == self._expected
        step = self.step
        padded, compact = unit.buckets(output, self.shard_size)
        bucket = compact if compact is not None else padded
        comm = Comm(self.group, BucketRecord(index=len(self._seen) - 1, numel=bucket.numel))
        try:
            # The step's staged state is kept or dropped as a whole at its last unit (see Compressor.reduce).
            mean = self.compressor.reduce(bucket, comm, step, ends_step=last)
        finally:
            self.telemetry.add(step, comm.record)
        if compact is not None:
            for (_, dst), (_, src) in zip(padded.views(), compact.views(mean)):
                dst.copy_(src)
        elif mean is not output:
            output.copy_(mean)
        if last:
            self._seen.clear()
            self.step += 1
            self.telemetry.end_step()

    # -- telemetry, checkpoints, lifetime ----------------------------------------

    def stats(self) -> dict[str, Any]:
        """As the DDP hook's: last step and cumulative bytes, ratio, times, residual norm; plus ``ef_bytes``."""
        return {**self.telemetry.summary(), "ef_bytes": state_bytes(self.compressor.state_dict())}

    def state_dict(self) -> dict[str, Any]:
        """This rank's state (tensors and plain values; loadable with ``torch.load(weights_only=True)``)."""
        return {
            "format": STATE_FORMAT,
            "config": config_to_dict(self.compressor.config),
            "world_size": self.world_size,
            "mesh": list(self.mesh),
            "rank": self.rank,
            "step": self.step,
            "compressor": self.compressor.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; another config, world size, mesh or rank is a :class:`CheckpointError`."""
        check_rank_state(
            state,
            fmt=STATE_FORMAT,
            what="HSDP compression",
            config=config_to_dict(self.compressor.config),
            world={"world_size": self.world_size, "mesh": list(self.mesh)},
            rank=self.rank,
            world_fix="resume on the same mesh",
        )
        self.compressor.load_state_dict(state["compressor"])
        self.step = int(state["step"])
        self._seen.clear()
        self.restored = True

    def close(self) -> None:
        """Nothing to stop: the hooks run inline, in FSDP's backward.

        The hooks stay installed: without them the 1-D FSDP model would no longer
        average its gradients over replicas.
        """

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("group", None)
        return state


def state_bytes(state: Any) -> int:
    """Bytes of every tensor in a (nested) compressor state: the memory its residuals and Q take per rank."""
    if isinstance(state, torch.Tensor):
        return 0 if state.dtype == torch.uint8 else state.numel() * state.element_size()  # uint8: RNG states
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def register_hsdp(
    model: nn.Module,
    compressor: str | Any,
    *,
    replicate_group: dist.ProcessGroup,
    error_feedback: str = "fp32",
    log_every: int = 0,
    **config: Any,
) -> HSDPState:
    """Compress HSDP's replica all-reduce of ``model`` over ``replicate_group``; call it on every rank.

    ``model`` must be sharded with ``fully_shard`` on the *shard* sub-mesh only
    (not on the 2-D mesh: torch's native HSDP all-reduces on its own first).
    ``compressor`` is a registered name (options as keyword arguments) or a
    compressor ``Config``. ``error_feedback`` is ``"fp32"`` (the compressor's own
    residuals, as large as this rank's shard: 1/shard of what an FSDP2 residual
    takes) or ``"none"`` (the compressor's ``error_feedback=False``). Raises
    :class:`~distcomp.errors.RankMismatchError` on every rank if the ranks were
    given different settings.
    """
    modules = fsdp_modules(model)
    shard_size = _shard_size(modules)
    comp = make_compressor(compressor, {**config, **_error_feedback_option(error_feedback)})
    replicas = dist.get_world_size(replicate_group)
    if replicas * shard_size != dist.get_world_size():
        raise ConfigError(
            f"replicate_group has {replicas} ranks and the FSDP shard group {shard_size}, but the job has "
            f'{dist.get_world_size()}: pass replicate_group=mesh.get_group("replicate") of the mesh whose '
            'mesh["shard"] the model was sharded on'
        )
    check_agreement({**config_to_dict(comp.config), "mesh": (replicas, shard_size)}, None)
    names = module_names(model)
    units = [_Unit(i, names[id(m)], tuple(managed_parameters(model, m))) for i, m in enumerate(modules)]
    state = HSDPState(comp, units, replicate_group=replicate_group, shard_size=shard_size, log_every=log_every)
    for module, unit in zip(modules, units):
        module.set_all_reduce_hook(functools.partial(state.on_reduce, unit))
    logger.info("distcomp HSDP: %s on %d FSDP units, %d replicas", comp.name, len(units), replicas)
    return state


def _error_feedback_option(mode: str) -> dict[str, Any]:
    """The compressor option that ``error_feedback`` of ``distcomp.fsdp.register`` stands for under HSDP."""
    if mode == "fp32":
        return {}
    if mode == "none":
        return {"error_feedback": False}
    raise ConfigError(
        f"error_feedback={mode!r} is not available for HSDP: its residuals are fp32 shards of this rank "
        '(1/shard of an FSDP2 residual); use "fp32" or "none"'
    )


def _shard_size(modules: list[FSDPModule]) -> int:
    """The size of the shard group the modules reduce-scatter over; refuses native (2-D) HSDP."""
    sizes = set()
    for module in modules:
        for group in module._get_fsdp_state()._fsdp_param_groups:
            mesh = group.mesh_info.mesh
            if mesh.ndim != 1:
                raise ConfigError(
                    f"FSDP module {type(module).__name__} is sharded on a {mesh.ndim}-D mesh (torch's native HSDP, "
                    "whose own replica all-reduce runs before any hook): shard it with "
                    'fully_shard(..., mesh=mesh["shard"]) and pass replicate_group=mesh.get_group("replicate")'
                )
            sizes.add(mesh.size())
    if len(sizes) > 1:
        raise ConfigError(f"the FSDP modules are sharded over groups of different sizes {sorted(sizes)}: use one mesh")
    return sizes.pop() if sizes else 1
