"""The compressed optimizers' step: gather, let the algorithm run, count the step.

An optimizer is three pieces:

* :class:`~distcomp.optim.state.FlatState` (``self.flat``): the fused buckets,
  one flat fp32 buffer per bucket and state key, and the checkpoint format;
* :class:`~distcomp.optim.comm.GradientComm` (``self.comm``): everything sent
  to other ranks (exact means, health words, the 1-bit exchange) and DDP's hook;
* :class:`CompressedOptimizer`: the step, and the hooks a subclass implements:
  :meth:`~CompressedOptimizer._run` (one step of its algorithm, given this
  rank's flat gradients) and :meth:`~CompressedOptimizer.gradient_mode`
  (whether a step needs the exactly averaged gradient or this rank's own).

Everything a step communicates is issued from ``step()``, synchronously,
bucket by bucket in the same order on every rank, except with DDP, whose hook
runs the exchange of a compressed step during backward
(:mod:`distcomp.optim.overlap`) when ``register`` was asked to overlap.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist

from distcomp.comm import BucketRecord
from distcomp.errors import CheckpointError
from distcomp.optim.comm import GradientComm, world_of
from distcomp.optim.config import OptimizerConfig, build, check_group
from distcomp.optim.functional import adam_denominator, bias_correction
from distcomp.optim.layout import FlatLayout
from distcomp.optim.lowbit import Role
from distcomp.optim.state import FlatState, standalone
from distcomp.telemetry import Telemetry
from distcomp.workspace import Workspace

logger = logging.getLogger("distcomp.optim")

GradientMode = Literal["mean", "local"]


class CompressedOptimizer(torch.optim.Optimizer):
    """Base of :class:`OneBitAdam`, :class:`ZeroOneAdam` and :class:`OneBitLamb`.

    Per-element state (momentum, variance, worker error, ...) lives in one flat
    fp32 buffer per bucket and key; ``self.state[p][key]`` is a view into it,
    so ``state_dict()`` numbers it by parameter like any torch optimizer.
    Gradients a rank does not have (``grad is None``) count as zeros.
    Checkpoints (``state_dict``) are per rank; see :mod:`distcomp.optim.state`.
    """

    Config: ClassVar[type[OptimizerConfig]] = OptimizerConfig
    algorithm: ClassVar[str] = ""
    element_keys: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq", "worker_error")
    """Per-element state, kept in flat fp32 buffers."""
    scalar_keys: ClassVar[tuple[str, ...]] = ()
    """Per-parameter Python floats."""
    error_keys: ClassVar[tuple[str, ...]] = ("worker_error",)
    """Per-element state that differs between ranks and is dropped by ``reset_errors``."""
    lowbit_keys: ClassVar[dict[str, Role]] = {"exp_avg": "momentum", "exp_avg_sq": "variance"}
    """Per-element state kept at ``state_dtype`` (the others stay fp32), with the quantizer each uses."""
    _step_supports_amp_scaling = True  # GradScaler calls step() on every rank; we skip non-finite steps together

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        process_group: dist.ProcessGroup | None = None,
        log_every: int = 0,
        reset_errors_from_other_ranks: bool = False,
        **options: Any,
    ) -> None:
        """``options`` are the fields of the class's ``Config`` (DeepSpeed's key names); unknown ones fail.

        ``reset_errors_from_other_ranks`` (also an attribute, for frameworks that build the
        optimizer): a checkpoint another rank of the same world size wrote, such as the
        single file rank 0 saves and every rank loads, loads with ``reset_errors=True``
        (moments and step kept, this rank's errors restarted) and one warning, instead of
        being refused.
        """
        self.reset_errors_from_other_ranks = reset_errors_from_other_ranks
        self._warned_other_rank = False
        self.config = config = build(self.Config, {"lr": lr, **options}, self.algorithm)
        self._bucket_cap_chosen = "bucket_cap_mb" in options
        self.flat = FlatState(
            self,
            self.algorithm,
            config.bucket_cap_numel,
            element_keys=self.element_keys,
            scalar_keys=self.scalar_keys,
            error_keys=self.error_keys,
            state_dtype=config.state_dtype,
            lowbit_keys=self.lowbit_keys,
        )
        """The fused buckets and their buffers (package-internal: subclasses read and write their state here)."""
        self.telemetry = Telemetry(log_every=log_every)
        self.comm = GradientComm(
            self.flat, process_group, block=config.block, telemetry=self.telemetry, clock=lambda: self._step
        )
        """Everything sent to other ranks (package-internal: subclasses and ``distcomp.optim.register`` use it)."""
        super().__init__(params, {k: getattr(config, k) for k in config.GROUP_KEYS})
        self._step = 0
        self._denoms: dict[int, tuple[tuple, torch.Tensor]] = {}  # frozen denominators (derived, not checkpointed)
        self._ws = Workspace()

    # -- what subclasses implement ------------------------------------------------------

    def gradient_mode(self, t: int | None = None) -> GradientMode:
        """``"mean"`` when step ``t`` (default: the next) needs the exactly averaged gradient, else ``"local"``."""
        raise NotImplementedError

    def _run(self, t: int, grads: list[torch.Tensor], health: torch.Tensor) -> bool:
        """Step ``t`` from this rank's flat fp32 gradients (scratch: may be overwritten); False when skipped."""
        raise NotImplementedError

    def _milestones(self) -> dict[int, str]:
        """Steps at which the algorithm changes phase, with what to log there."""
        return {}

    # With DDP, a step whose 1-bit exchange needs only this rank's gradient runs that exchange during
    # backward (distcomp.optim.overlap): the step-time path and the overlapped one share these three.

    def _overlaps(self, t: int) -> bool:
        """Whether step ``t``'s exchange may run from DDP's hook (it reads nothing but this rank's gradient)."""
        return False

    def _exchange_value(self, t: int, layout: FlatLayout, g: torch.Tensor) -> torch.Tensor:
        """What step ``t`` averages in 1 bit for the bucket, from its gradient ``g`` (written into ``g``).

        Changes no state: on a non-finite step nothing of it may remain.
        """
        raise NotImplementedError

    def _take_mean(self, t: int, layout: FlatLayout, mean: torch.Tensor) -> Any:
        """The rest of step ``t`` for the bucket, from the averaged value (``mean`` may be overwritten)."""
        raise NotImplementedError

    def _exchanged_step(self, t: int, means: list[torch.Tensor]) -> None:
        """Step ``t`` from every bucket's averaged value (the exchange ran during backward)."""
        for layout, mean in zip(self.flat.layouts, means):
            self._take_mean(t, layout, mean)

    def _after_load(self, reset_errors: bool) -> None:
        """Subclass checks once a checkpoint is restored."""

    # -- public ---------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """Steps taken so far (steps skipped for non-finite gradients do not count); phases follow from it."""
        return self._step

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        """The group the optimizer averages over (None: the default group)."""
        return self.comm.group

    @property
    def world_size(self) -> int:
        """Ranks of the process group (1 without torch.distributed)."""
        return self.comm.world

    def stats(self) -> dict[str, Any]:
        """Bytes and times per step, as the DDP hooks report them (``{"step", "buckets", "total"}``), and
        ``"state"``: :meth:`state_bytes`."""
        return {**self.telemetry.summary(), "state": self.state_bytes()}

    def state_bytes(self) -> dict[str, float]:
        """Optimizer-state bytes per parameter held between steps: ``momentum``, ``variance``, ``errors``
        (worker and server error feedback; on FSDP also the 1-bit copy of the momentum), ``other``
        (0/1 Adam's accumulator and anchor) and ``total``. On FSDP, this rank's bytes per model parameter.

        Counts what exists so far (a buffer is made on its first use, e.g. the
        errors at the first compressed step); scratch of one bucket and the
        derived frozen denominators of fp32 state are not counted.
        """
        # Under FSDP: this rank's bytes per parameter of the whole model (its state is a shard of it).
        params = sum(sum(layout.numels()) for layout in self.flat.layouts)
        out = dict.fromkeys(("momentum", "variance", "errors", "other"), 0.0)
        for key, nbytes in self.flat.nbytes().items():
            kind = "errors" if key in self.error_keys or key == "server_error" else self.lowbit_keys.get(key, "other")
            out[kind] += nbytes / max(params, 1)
        if self.comm.fsdp is not None:  # worker and server errors and the 1-bit momentum of the reduce-scatters
            out["errors"] += self.comm.fsdp.ef_bytes() / max(params, 1)
        out["total"] = sum(out.values())
        return out

    def bucket_layout(self) -> list[list[int]]:
        """The fused buckets as lists of ``state_dict`` parameter indices, in communication order."""
        return [list(layout.ids) for layout in self.flat.layouts]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # torch's __init__ adds the first groups: then flat and comm exist but nothing has started
        if self.comm.connected or self.flat.started:
            raise RuntimeError(
                f"{type(self).__name__}: add_param_group after the first step is not supported: the fused "
                "buckets and their error buffers are fixed then; create the optimizer with every group"
            )
        self.flat.regroup()
        super().add_param_group(param_group)
        check_group(self.param_groups[-1], f"param_groups[{len(self.param_groups) - 1}].")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One optimizer step; a step whose gradients are non-finite on any rank is skipped on every rank."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._ready()
        t = self._step
        self.comm.check_served(t)
        if self.comm.rank == 0 and t in self._milestones():
            logger.info("%s: step %d: %s", self.algorithm, t, self._milestones()[t])
        exchanged = self.comm.take_exchanged(t)
        if exchanged is not None:
            ran = exchanged.finite
            if ran:
                self._exchanged_step(t, exchanged.means)
        else:
            grads, health = self.comm.gather(getattr(self, "grad_scale", None))
            ran = self._run(t, grads, health)
        self.flat.commit()
        if ran:
            self._step += 1
        else:
            self.comm.record(BucketRecord(index=-1, numel=0, nonfinite=True))
        self.telemetry.end_step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus this rank's server errors, step and world (see :mod:`distcomp.optim.state`)."""
        out = super().state_dict()
        # Sharded state is a DTensor view of a fused buffer, which torch.save cannot write: save a copy.
        out["state"] = {i: {k: standalone(v) for k, v in entries.items()} for i, entries in out["state"].items()}
        out["distcomp"] = self.flat.section(
            config=self.config.trajectory(), world=self.comm.world, rank=self.comm.rank, step=self._step
        )
        if self.comm.fsdp is not None:  # FSDP: the worker errors live with the reduce-scatters
            out["distcomp"]["fsdp"] = self.comm.fsdp.state_dict()
        return out

    def load_state_dict(self, state_dict: dict[str, Any], *, reset_errors: bool = False) -> None:
        """Restore :meth:`state_dict` exactly; raise :class:`CheckpointError` on any mismatch.

        ``reset_errors=True`` allows a checkpoint from another world size or rank:
        the worker and server errors (the only state that differs between ranks)
        start again from zero, everything else is restored. 0/1 Adam additionally
        needs the checkpoint to be at a synchronisation point.
        """
        world, rank = world_of(self.process_group)
        reset_errors = reset_errors or self._another_ranks(state_dict, world, rank)
        self._adopt_bucket_cap(state_dict)
        section = self.flat.check(
            state_dict, config=self.config.trajectory(), world=world, rank=rank, reset_errors=reset_errors
        )
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        if self.comm.overlap is not None:
            self.comm.overlap.drop()
        self._denoms = {}
        self.flat.load(state_dict["state"], section, reset_errors)
        self._load_fsdp(section.get("fsdp"), reset_errors)
        self._step = int(section["step"])
        self._after_load(reset_errors)

    def _another_ranks(self, state_dict: dict[str, Any], world: int, rank: int) -> bool:
        """Whether to restart the errors because another rank of this world size wrote the state (opted in)."""
        section = _section(state_dict)
        if not self.reset_errors_from_other_ranks or not section:
            return False
        if section.get("rank") == rank or section.get("world_size") != world:
            return False
        if not self._warned_other_rank:
            self._warned_other_rank = True
            logger.warning(
                "%s: rank %d loads the optimizer state rank %s wrote (reset_errors_from_other_ranks): moments and "
                "step kept, this rank's error feedback restarts from zero",
                self.algorithm,
                rank,
                section.get("rank"),
            )
        return True

    def _adopt_bucket_cap(self, state_dict: dict[str, Any]) -> None:
        """Take the checkpoint's ``bucket_cap_mb`` if the user chose none and no bucket exists yet.

        The default changed (64 to 25 MB, so that smaller models overlap
        backward too); a checkpoint written with the old default then loads
        with the bucket layout it was written with instead of being refused.
        """
        saved = _section(state_dict).get("config", {}).get("bucket_cap_mb")
        # A chosen cap stays: FlatState.check then refuses a checkpoint written with another.
        if saved is not None and self.set_default_bucket_cap(float(saved)):
            logger.info("%s: bucket_cap_mb=%g from the checkpoint (its bucket layout)", self.algorithm, saved)

    def set_default_bucket_cap(self, mb: float) -> bool:
        """Rebuild the fused buckets at most ``mb`` MB each, unless the user chose ``bucket_cap_mb``;
        whether they changed.

        Only before any bucket holds state (package-internal: ``distcomp.optim.register``
        makes them follow DDP's buckets, a checkpoint brings the layout it was written with).
        """
        if self._bucket_cap_chosen or self.flat.started or mb == self.config.bucket_cap_mb:
            return False
        self.config = dataclasses.replace(self.config, bucket_cap_mb=mb)
        self.flat.cap_numel = self.config.bucket_cap_numel
        self.flat.regroup()
        if self.comm.overlap is not None:
            self.comm.overlap.forget_layout()
        return True

    def _load_fsdp(self, saved: dict[str, Any] | None, reset_errors: bool) -> None:
        """The FSDP reduce-scatters' worker errors, saved with an FSDP run, restored into this one's."""
        if (saved is None) != (self.comm.fsdp is None):
            raise CheckpointError(
                f"{self.algorithm}: the checkpoint was written "
                + ("with" if saved is not None else "without")
                + " distcomp.optim.register on an FSDP model, this optimizer is "
                + ("not" if self.comm.fsdp is None else "")
                + " registered on one; call distcomp.optim.register(model, opt) before load_state_dict, "
                "the same way as the run that saved it"
            )
        if saved is not None and self.comm.fsdp is not None and not reset_errors:
            self.comm.fsdp.load_state_dict(saved)

    # -- set-up ---------------------------------------------------------------------------

    def _ready(self) -> None:
        """Layouts, world, and (once, on every rank) a check that the ranks agree on everything that matters."""
        if self.comm.connected:
            return
        groups = [
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
            for g in self.param_groups
        ]
        self.comm.connect(
            {
                "algorithm": self.algorithm,
                **self.config.trajectory(),
                "groups": groups,
                "buckets": [layout.numels() for layout in self.flat.layouts],
            }
        )

    # -- update-rule helpers ------------------------------------------------------------------

    def _denominator(self, layout: FlatLayout, v_updates: int, frozen: bool = False) -> torch.Tensor:
        """``sqrt(v_hat) + eps`` of the bucket; with ``frozen``, computed once and kept while ``v`` stays frozen."""
        group = self.param_groups[layout.group]
        # Low-bit state keeps no fp32 copy of a frozen denominator: it would cost 4 bytes a parameter.
        frozen = frozen and "exp_avg_sq" not in self.flat.lowbit
        key = (v_updates, group["eps"], group["betas"][1], group["bias_correction"])
        cached = self._denoms.get(layout.index) if frozen else None
        if cached is not None and cached[0] == key:
            return cached[1]
        out = (
            cached[1]
            if cached is not None
            else (
                torch.empty(layout.numel, dtype=torch.float32, device=layout.device)
                if frozen
                else self._scratch("denom", layout)
            )
        )
        bc2 = bias_correction(group["betas"][1], v_updates, group["bias_correction"])
        adam_denominator(
            self.flat.buffer(layout, "exp_avg_sq", write=False), bc2, group["eps"], self.config.eps_inside_sqrt, out=out
        )
        if frozen:
            self._denoms[layout.index] = (key, out)
        return out

    def _scratch(self, name: str, layout: FlatLayout) -> torch.Tensor:
        """A bucket-sized fp32 scratch buffer, reused from step to step."""
        return self._ws.get(name, layout.numel, torch.float32, layout.device)


def _section(state_dict: Any) -> dict[str, Any]:
    """A checkpoint's ``distcomp`` section, or an empty one (``FlatState.check`` says what is wrong with it)."""
    section = state_dict.get("distcomp") if isinstance(state_dict, dict) else None
    return section if isinstance(section, dict) else {}
