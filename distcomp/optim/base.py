"""What the compressed optimizers share: fused state, gradient averaging, the 1-bit all-reduce, checkpoints.

A subclass implements :meth:`CompressedOptimizer._run` (one step of its
algorithm, given this rank's flat gradients) and :meth:`gradient_mode` (whether
a step needs the exactly averaged gradient or this rank's own). Everything a
step communicates is issued from ``step()``, synchronously, bucket by bucket in
the same order on every rank.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist

from distcomp.collectives import chunk_length, two_phase_mean
from distcomp.comm import BucketRecord, Comm
from distcomp.numerics import l2_norm, local_health
from distcomp.compressors.sign import SignCodec
from distcomp.errors import CheckpointError
from distcomp.agreement import check_agreement
from distcomp.optim.config import OptimizerConfig, build, check_group
from distcomp.optim.functional import adam_denominator, bias_correction
from distcomp.optim.layout import FlatLayout, build_layouts
from distcomp.optim.state import StateMixin, world_of
from distcomp.telemetry import Telemetry
from distcomp.workspace import Workspace

logger = logging.getLogger("distcomp.optim")

GradientMode = Literal["mean", "local"]


class CompressedOptimizer(StateMixin, torch.optim.Optimizer):
    """Base of :class:`OneBitAdam`, :class:`ZeroOneAdam` and :class:`OneBitLamb`.

    Per-element state (momentum, variance, worker error, ...) lives in one flat
    fp32 buffer per bucket and key; ``self.state[p][key]`` is a view into it,
    so ``state_dict()`` numbers it by parameter like any torch optimizer.
    Gradients a rank does not have (``grad is None``) count as zeros.
    """

    Config: ClassVar[type[OptimizerConfig]] = OptimizerConfig
    algorithm: ClassVar[str] = ""
    _step_supports_amp_scaling = True  # GradScaler calls step() on every rank; we skip non-finite steps together

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        process_group: dist.ProcessGroup | None = None,
        log_every: int = 0,
        **options: Any,
    ) -> None:
        """``options`` are the fields of the class's ``Config`` (DeepSpeed's key names); unknown ones fail."""
        self.config = config = build(self.Config, {"lr": lr, **options}, self.algorithm)
        self._layouts: list[FlatLayout] | None = None
        super().__init__(params, {k: getattr(config, k) for k in config.GROUP_KEYS})
        self.process_group = process_group
        self.telemetry = Telemetry(log_every=log_every)
        self._step = 0
        self._world: int | None = None
        self._rank = 0
        self._flats: dict[tuple[int, str], torch.Tensor] = {}
        self._server: dict[int, torch.Tensor] = {}
        self._scalars: dict[int, dict[str, float]] = {}
        self._denoms: dict[int, tuple[tuple, torch.Tensor]] = {}  # frozen denominators (derived, not checkpointed)
        self._ws = Workspace()
        self._comm_ws = Workspace()
        self._codec = SignCodec(config.block)
        self._ddp: Any = None  # set by distcomp.optim.register(ddp_model, optimizer)

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

    # -- public ---------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """Steps taken so far (steps skipped for non-finite gradients do not count); phases follow from it."""
        return self._step

    @property
    def world_size(self) -> int:
        """Ranks of the process group (1 without torch.distributed)."""
        return self._world if self._world is not None else world_of(self.process_group)[0]

    def stats(self) -> dict[str, Any]:
        """Bytes and times per step, as the DDP hooks report them (``{"step", "buckets", "total"}``)."""
        return self.telemetry.summary()

    def bucket_layout(self) -> list[list[int]]:
        """The fused buckets as lists of ``state_dict`` parameter indices, in communication order."""
        return [list(layout.ids) for layout in self._ensure_layouts()]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_world", None) is not None or getattr(self, "_flats", None):
            raise RuntimeError(
                f"{type(self).__name__}: add_param_group after the first step is not supported: the fused "
                "buckets and their error buffers are fixed then; create the optimizer with every group"
            )
        self._layouts = None
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
        if self._ddp is not None:
            self._ddp.check_served(t)
        if self._rank == 0 and t in self._milestones():
            logger.info("%s: step %d: %s", self.algorithm, t, self._milestones()[t])
        grads, health = self._gather()
        if self._run(t, grads, health):
            self._step += 1
        else:
            self.telemetry.add(t, BucketRecord(index=-1, numel=0, nonfinite=True))
        self.telemetry.end_step()
        return loss

    # -- set-up ---------------------------------------------------------------------------

    def _ensure_layouts(self) -> list[FlatLayout]:
        if self._layouts is None:
            self._layouts = build_layouts(self.param_groups, self.config.bucket_cap_numel)
        return self._layouts

    def _ready(self) -> None:
        """Layouts, world, and (once, on every rank) a check that the ranks agree on everything that matters."""
        if self._world is not None:
            return
        layouts = self._ensure_layouts()
        self._world, self._rank = world_of(self.process_group)
        if self._world > 1:
            groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
                      for g in self.param_groups]
            settings = {"algorithm": self.algorithm, **self.config.trajectory(), "groups": groups,
                        "buckets": [layout.numels() for layout in layouts], "ddp": self._ddp is not None}
            check_agreement(settings, self.process_group, what=f"{self.algorithm} settings")

    # -- per-element state ------------------------------------------------------------------

    def _flat(self, layout: FlatLayout, key: str) -> torch.Tensor:
        """The bucket's flat fp32 buffer for ``key``, made on first use (zeros, or the loaded per-parameter state)."""
        flat = self._flats.get((layout.index, key))
        if flat is None:
            flat = torch.zeros(layout.numel, dtype=torch.float32, device=layout.device)
            for p, view in zip(layout.params, layout.views(flat)):
                loose = self.state[p].get(key)
                if loose is not None:
                    view.copy_(loose.reshape(p.shape))
                self.state[p][key] = view
            self._flats[(layout.index, key)] = flat
        return flat

    def _denominator(self, layout: FlatLayout, v_updates: int, frozen: bool = False) -> torch.Tensor:
        """``sqrt(v_hat) + eps`` of the bucket; with ``frozen``, computed once and kept while ``v`` stays frozen."""
        group = self.param_groups[layout.group]
        key = (v_updates, group["eps"], group["betas"][1], group["bias_correction"])
        cached = self._denoms.get(layout.index) if frozen else None
        if cached is not None and cached[0] == key:
            return cached[1]
        out = cached[1] if cached is not None else (
            torch.empty(layout.numel, dtype=torch.float32, device=layout.device) if frozen
            else self._scratch("denom", layout))
        bc2 = bias_correction(group["betas"][1], v_updates, group["bias_correction"])
        adam_denominator(self._flat(layout, "exp_avg_sq"), bc2, group["eps"], self.config.eps_inside_sqrt, out=out)
        if frozen:
            self._denoms[layout.index] = (key, out)
        return out

    def _scratch(self, name: str, layout: FlatLayout) -> torch.Tensor:
        return self._ws.get(name, layout.numel, torch.float32, layout.device)

    # -- gradients --------------------------------------------------------------------------

    def _gather(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every bucket's gradients as flat fp32 (unscaled when GradScaler drives the step) and their health word."""
        scale = getattr(self, "grad_scale", None)
        inv = None if scale is None else scale.double().reciprocal().float()
        flats, health = [], None
        for layout in self._ensure_layouts():
            flat = self._ws.get(f"grad{layout.index}", layout.numel, torch.float32, layout.device)
            for p, view in zip(layout.params, layout.views(flat)):
                if p.grad is None:
                    view.zero_()
                elif p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                else:
                    view.copy_(p.grad)
            if inv is not None:
                flat.mul_(inv.to(flat.device))
            h = local_health(flat)
            health = h if health is None else health + h.to(health.device)
            flats.append(flat)
        return flats, health if health is not None else torch.zeros(1)

    def _exact_mean(self, grads: list[torch.Tensor], health: torch.Tensor) -> bool:
        """Average ``grads`` over ranks in place (unless DDP's hook did); False if any rank's were non-finite."""
        if self._ddp is not None or self._world == 1:
            return _finite(health)
        for layout, flat in zip(self._ensure_layouts(), grads):
            comm = self._comm(layout.index, layout.numel)
            start = time.perf_counter()
            flat.div_(self._world)  # divide first, like DDP (keeps the sum from overflowing)
            comm.all_reduce(flat)
            comm.record.total_s = time.perf_counter() - start
            self.telemetry.add(self._step, comm.record)
        return _finite(sum((local_health(f) for f in grads[1:]), local_health(grads[0])) if grads else health)

    def _agree(self, health: torch.Tensor) -> bool:
        """Whether every rank's gradients are finite, for steps that otherwise send nothing (4 bytes)."""
        if self._world == 1:
            return _finite(health)
        comm = self._comm(0, sum(layout.numel for layout in self._ensure_layouts()))
        comm.record.compressed = True
        if self._ddp is None:  # with DDP, its hook has agreed on the health word already
            health = comm.all_reduce(health.clone())
        self.telemetry.add(self._step, comm.record)
        return _finite(health)

    def _compressed(self, layout: FlatLayout, x: torch.Tensor, health: torch.Tensor) -> torch.Tensor | None:
        """The 1-bit two-phase mean of ``x`` with worker and server error feedback; None if any rank was non-finite.

        ``x`` (scratch) is overwritten. The result lives in a workspace: copy it
        before the next call. On a single rank nothing is compressed.
        """
        if self._world == 1:
            return x
        start = time.perf_counter()
        comm = self._comm(layout.index, layout.numel)
        comm.record.compressed = True
        werr = self._flat(layout, "worker_error")
        x.add_(werr)
        chunk = chunk_length(layout.numel, self._world, self._codec.align)
        server = self._server.get(layout.index)
        if server is None:
            server = self._server[layout.index] = torch.zeros(chunk, dtype=torch.float32, device=layout.device)
        elif server.numel() != chunk:
            raise CheckpointError(f"{self.algorithm}: the server error of bucket {layout.index} has {server.numel()} "
                                  f"values but this world size needs {chunk}")
        res = two_phase_mean(comm, self._codec, x, server, health, self._comm_ws)
        if res.nonfinite:
            comm.record.nonfinite = True
        else:
            torch.sub(x, res.local_decoded, out=werr)
            self._server[layout.index] = res.server_error
            comm.record.residual_norm = l2_norm(werr)
        comm.record.total_s = time.perf_counter() - start
        self.telemetry.add(self._step, comm.record)
        return None if res.nonfinite else res.out

    def _reset_errors(self) -> None:
        """Zero the worker and server errors (when what is compressed changes meaning)."""
        for layout in self._ensure_layouts():
            if (layout.index, "worker_error") in self._flats:
                self._flats[(layout.index, "worker_error")].zero_()
            if layout.index in self._server:
                self._server[layout.index].zero_()

    def _comm(self, index: int, numel: int) -> Comm:
        return Comm(self.process_group, BucketRecord(index=index, numel=numel))

    def _record(self, rec: BucketRecord) -> None:
        """Add a record made outside ``step()`` (DDP's hook) to the current step's telemetry."""
        self.telemetry.add(self._step, rec)


def _finite(health: torch.Tensor) -> bool:
    return bool(torch.isfinite(health).all())
