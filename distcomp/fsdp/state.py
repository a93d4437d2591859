"""The state of a compressed FSDP2 model: compressor, worker residuals per FSDP unit, telemetry.

FSDP2 calls each FSDP module's reduce-scatter once per synchronizing backward, in
the same order every step. A step ends when a module is called a second time
(or when :meth:`FSDPCompressionState.stats` / :meth:`~FSDPCompressionState.state_dict`
is asked for): its new residuals are staged until then, and dropped as a whole
if any module's gradients were non-finite, so a step a scaler skips leaves no trace.

Error-feedback modes (what a worker residual costs per gradient element):
``"fp32"`` 4 bytes, exact; ``"bf16"`` 2 bytes; ``"int8"`` 1.03 bytes (int8 blocks
of 128 values with an fp32 scale, rounded stochastically from a per-rank
generator, :mod:`distcomp.fsdp.residuals`); ``"none"`` nothing. Without feedback int8 and int4 stay unbiased (they round
stochastically), while sign is biased (its error is never returned) and topk
drops most of the gradient for good.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from distcomp.codecs import CastCodec, RandomKCodec, TopKCodec
from distcomp.comm import Comm
from distcomp.compressor import Compressor
from distcomp.config import config_to_dict
from distcomp.errors import CheckpointError, DistcompError
from distcomp.fsdp.modules import ParamSlot
from distcomp.fsdp.residuals import QuantizedRows, dequantize_unit, quantize_unit
from distcomp.rankstate import check_rank_state
from distcomp.telemetry import Telemetry

STATE_FORMAT = "distcomp.fsdp/1"
ErrorFeedbackMode = Literal["fp32", "bf16", "int8", "none"]
RESIDUAL_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""Modes that hold a unit's residual as one dense tensor of this dtype."""
QUANTIZED_MODES = ("int8",)
DEFAULT_ERROR_FEEDBACK: ErrorFeedbackMode = "int8"
"""FSDP2's default: the cheapest mode whose held-out loss stayed within the noise of fp32 residuals for sign,
int8 and topk (benchmarks/fsdp_error_feedback.py; docs/fsdp.md has the figures). HSDP and FSDP1 keep fp32."""
RESIDUAL_SEED = 0x5EED
"""Seed of the generator that rounds int8 residuals, plus the rank (ranks need not agree on it)."""
"""Modes that hold each parameter's residual as int8 blocks (:class:`~distcomp.fsdp.residuals.QuantizedRows`)."""
Held = torch.Tensor | tuple[QuantizedRows, ...]
"""A unit's residual as held: dense ``[world_size, shard]``, or one quantized part per parameter slot."""
logger = logging.getLogger("distcomp")


@dataclass(frozen=True)
class Unit:
    """One FSDP module: its qualified name and the layout of its reduce-scatter chunks."""

    name: str
    slots: tuple[ParamSlot, ...]

    @property
    def shard_numel(self) -> int:
        """Elements of one rank's chunk when every trainable parameter has a gradient."""
        return sum(s.numel for s in self.slots)


class FSDPCompressionState:
    """What ``distcomp.fsdp.register`` returns: ``stats()``, ``state_dict()``, ``load_state_dict()``, ``close()``.

    Checkpointing: :meth:`state_dict` holds this rank's worker residuals keyed by
    parameter name (each ``[world_size, padded shard]``, one row per destination
    rank), the compressor's own state (random streams), the step, and the config,
    error-feedback mode, world size and rank it was made with. Save one file per rank.
    With ``error_feedback="int8"`` each residual is ``{"codes": int8, "scales": fp32}``
    (rows padded to whole blocks), exactly as held, and ``residual_generator`` holds
    the state of the generator that rounds them.
    """

    def __init__(
        self,
        model: nn.Module,
        compressor: Compressor,
        units: list[Unit],
        *,
        error_feedback: ErrorFeedbackMode,
        world_size: int,
        rank: int,
        log_every: int = 0,
    ) -> None:
        self.compressor = compressor
        self.units = {u.name: u for u in units}
        self.error_feedback = error_feedback
        self.world_size = world_size
        self.rank = rank
        self.step = 0
        self.restored = False
        """Whether a checkpoint's state was loaded (a resumed run that did not is warned, see distcomp.checkpoint)."""
        self.telemetry = Telemetry(log_every=log_every)
        self._residuals: dict[str, Held] = {}
        self._staged: dict[str, Held] = {}
        self._called: set[str] = set()
        self._nonfinite = False
        self._model_name = type(model).__name__
        self.residual_generator: torch.Generator | None = None
        """With int8 residuals: the generator they are rounded with (stochastic rounding is unbiased; it
        measured better than rounding to nearest with topk). None rounds to nearest, an experiment of
        benchmarks/fsdp_error_feedback.py."""
        if error_feedback in QUANTIZED_MODES:
            self.residual_generator = torch.Generator().manual_seed(RESIDUAL_SEED + rank)

    # -- used by the reduce-scatter comms ----------------------------------------

    def begin_call(self, unit: str) -> None:
        """A module's reduce-scatter starts; a module seen before in this step closes the previous step."""
        if unit in self._called:
            self._end_step()
        if not self._called:
            self.compressor.begin_step()
        self._called.add(unit)

    def compressing(self) -> bool:
        """Whether this step is compressed (``none`` never is; others from their ``start_step``)."""
        return self.compressor.name != "none" and self.step >= self.compressor.config.start_step

    def codec(self, comm: Comm, device: torch.device) -> tuple[str, Any]:
        """``(kind, codec)``: ``block`` (sign, int8, int4), ``cast`` (bf16, fp16) or ``sparse`` (topk, randomk)."""
        comp = self.compressor
        if hasattr(comp, "codec"):
            return "block", comp.codec(comm, device)
        if hasattr(comp, "wire_dtype"):
            return "cast", CastCodec(comp.wire_dtype)
        return "sparse", None

    def sparse_k(self, shard: int) -> int:
        """Entries sent per chunk of ``shard`` values (``ratio`` or ``k`` of the compressor)."""
        return self.compressor.config.k_for(shard) if shard else 0  # type: ignore[attr-defined]

    def sparse_codec(self, shard: int, k: int, device: torch.device) -> TopKCodec | RandomKCodec:
        """The codec of one chunk; random-k draws its indices from the compressor's shared generator."""
        if self.compressor.name == "topk":
            return TopKCodec(k)
        return RandomKCodec.draw(shard, k, self.compressor.generator, device)  # type: ignore[attr-defined]

    def residual(self, unit: str, world_size: int, shard: int, device: torch.device) -> torch.Tensor | None:
        """The unit's worker residual as fp32 ``[world_size, shard]``, or None without error feedback."""
        if not self._feedback():
            return None
        expected = self.units[unit].shard_numel
        if shard != expected:
            raise DistcompError(
                f"FSDP unit {unit or '<root>'!r} reduced {shard} values per rank but its trainable parameters "
                f"have {expected}: a parameter got no gradient this step. Error feedback keys residuals by "
                "parameter, so every trainable parameter needs a gradient: call "
                "set_reduce_scatter_unused_params(True) on the model, or freeze the unused parameter"
            )
        stored = self._residuals.get(unit)
        if stored is None:
            return torch.zeros(world_size, shard, dtype=torch.float32, device=device)
        if isinstance(stored, tuple):
            return dequantize_unit(stored, self.units[unit].slots, world_size, device)
        return stored.to(device=device, dtype=torch.float32)

    def stage(self, unit: str, residual: torch.Tensor | None) -> None:
        """Keep ``residual`` until the step ends; None marks the step non-finite (all its residuals are dropped)."""
        if residual is None:
            self._nonfinite = True
            return
        if self.error_feedback in QUANTIZED_MODES:
            self._staged[unit] = quantize_unit(residual, self.units[unit].slots, self.residual_generator)
        else:
            self._staged[unit] = residual.to(RESIDUAL_DTYPES[self.error_feedback])

    def _feedback(self) -> bool:
        return self.error_feedback != "none" and bool(getattr(self.compressor.config, "error_feedback", True))

    def _end_step(self) -> None:
        keep = not self._nonfinite
        if keep:
            self._residuals.update(self._staged)
        self.compressor.end_step(keep)
        self._staged, self._called, self._nonfinite = {}, set(), False
        self.telemetry.end_step()
        self.step += 1

    def flush(self) -> None:
        """Close the step in progress, if any (its residuals become current or are dropped)."""
        if self._called:
            self._end_step()

    # -- telemetry, checkpoints, lifetime ----------------------------------------

    def ef_bytes(self) -> int:
        """Bytes this rank holds in worker residuals (as many values as the unsharded gradients they cover)."""
        return sum(_held_bytes(held) for held in self._residuals.values())

    def stats(self) -> dict[str, Any]:
        """The DDP hook's stats (last step and cumulative), plus ``ef_bytes``, ``error_feedback`` and ``units``."""
        self.flush()
        out = self.telemetry.summary()
        out.update(ef_bytes=self.ef_bytes(), error_feedback=self.error_feedback, units=len(self.units))
        return out

    def state_dict(self) -> dict[str, Any]:
        """This rank's state (tensors and plain values; loadable with ``torch.load(weights_only=True)``)."""
        self.flush()
        residuals: dict[str, Any] = {}
        for name, held in self._residuals.items():
            slots = self.units[name].slots
            if isinstance(held, tuple):
                residuals.update((slot.name, part.state_dict()) for slot, part in zip(slots, held, strict=True))
            else:
                residuals.update((slot.name, held[:, slot.offset : slot.offset + slot.numel].clone()) for slot in slots)
        return {
            "format": STATE_FORMAT,
            "config": config_to_dict(self.compressor.config),
            "error_feedback": self.error_feedback,
            "world_size": self.world_size,
            "rank": self.rank,
            "step": self.step,
            "residuals": residuals,
            "compressor": self.compressor.state_dict(),
            **self._generator_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; another config, world size, rank or model is a :class:`CheckpointError`."""
        check_rank_state(
            state,
            fmt=STATE_FORMAT,
            what="FSDP compression",
            config=config_to_dict(self.compressor.config),
            options={"error_feedback": self.error_feedback},
            world={"world_size": self.world_size},
            rank=self.rank,
            world_fix="resume with the same world size and mesh",
        )
        self._check_residual_names(state)
        restored: dict[str, Held] = {}
        for unit in self.units.values():
            held = self._restore_unit(unit, state["residuals"])
            if held is not None:
                restored[unit.name] = held
        self.compressor.load_state_dict(state["compressor"])
        if self.residual_generator is not None and "residual_generator" in state:
            self.residual_generator.set_state(state["residual_generator"])
        self._residuals, self._staged, self._called, self._nonfinite = restored, {}, set(), False
        self.step = int(state["step"])
        self.restored = True

    def _generator_state(self) -> dict[str, torch.Tensor]:
        """The residual generator's state, in int8 mode only (the fp32 and bf16 formats stay as they were)."""
        if self.residual_generator is None:
            return {}
        return {"residual_generator": self.residual_generator.get_state()}

    def _restore_unit(self, unit: Unit, residuals: dict[str, Any]) -> Held | None:
        """The unit's residual from a checkpoint's ``residuals``; None when it has none (no step yet)."""
        parts = [residuals.get(slot.name) for slot in unit.slots]
        if all(p is None for p in parts):
            return None
        if self.error_feedback in QUANTIZED_MODES and all(p is not None for p in parts):
            return tuple(
                QuantizedRows.from_state_dict(p, self.world_size, slot.numel, slot.name)
                for p, slot in zip(parts, unit.slots)
            )
        dense = [p for p in parts if isinstance(p, torch.Tensor)]
        if len(dense) < len(parts) or any(p.shape != (self.world_size, s.numel) for p, s in zip(dense, unit.slots)):
            raise CheckpointError(
                f"residuals of FSDP unit {unit.name or '<root>'!r} do not match its parameters: the "
                "checkpoint was written for another model or sharding; resume with the same model and mesh"
            )
        return torch.cat(dense, dim=1)

    def _check_residual_names(self, state: dict[str, Any]) -> None:
        unknown = set(state["residuals"]) - {s.name for u in self.units.values() for s in u.slots}
        if unknown:
            raise CheckpointError(
                f"checkpoint has residuals for parameters this model does not shard: {sorted(unknown)[:5]}; "
                "resume with the same model and the same fully_shard wrapping"
            )

    def close(self) -> None:
        """Nothing runs in the background; kept for the same lifetime calls as the DDP state."""
        self.flush()


def _held_bytes(held: Held) -> int:
    if isinstance(held, tuple):
        return sum(part.nbytes for part in held)
    return held.numel() * held.element_size()
