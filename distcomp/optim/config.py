"""Options every compressed optimizer shares, under DeepSpeed's key names."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from distcomp import schema
from distcomp.optim.lowbit import STATE_DTYPES, StateDtype
from distcomp.validation import require

C = TypeVar("C", bound="OptimizerConfig")


@dataclass(kw_only=True, frozen=True)
class OptimizerConfig:
    """Adam's hyperparameters plus how momentum is compressed and bucketed."""

    GROUP_KEYS: ClassVar[tuple[str, ...]] = ("lr", "betas", "eps", "weight_decay", "bias_correction")
    """Fields that are per parameter group (``param_groups`` entries may override them)."""

    lr: float = 1e-3
    """Learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Decay rates of the momentum and of the variance."""
    eps: float = 1e-8
    """Added to the denominator for numerical stability."""
    weight_decay: float = 0.0
    """Weight decay; decoupled (AdamW style) unless ``adam_w_mode`` is false where the optimizer has it."""
    bias_correction: bool = True
    """Divide the moments by ``1 - beta ** updates`` (DeepSpeed accepted this key but ignored it)."""
    eps_inside_sqrt: bool = False
    """Use ``sqrt(v + eps)`` instead of ``sqrt(v) + eps`` as the denominator."""
    amsgrad: bool = False
    """Accepted for DeepSpeed compatibility; only false is supported (as in DeepSpeed)."""
    block: int = 2048
    """Values sharing one fp32 scale in the 1-bit code; a multiple of 32. Smaller blocks are more accurate
    and send more scales (2048: about 31x fewer bytes than an fp32 all-reduce)."""
    bucket_cap_mb: float = 25.0
    """Largest fused bucket of momentum, in MB of fp32; each bucket is one compressed all-reduce per step.
    It is also the unit that overlaps backward: unless set, ``distcomp.optim.register`` makes it DDP's
    ``bucket_cap_mb``, and a checkpoint loads with the one it was written with (the default was 64)."""
    state_dtype: StateDtype = "fp32"
    """How the momentum and the (frozen) variance are kept between steps: ``fp32``; ``bf16``; ``int8`` or
    ``int4`` (blocks of 256 or 128 values with one fp32 scale; a zero-free grid of ``sqrt(v)`` for the variance).
    Error-feedback buffers stay fp32. A step decodes one bucket at a time into fp32 scratch."""

    def __post_init__(self) -> None:
        check_group(self, "")
        require(
            self.block >= 32 and self.block % 32 == 0, "block", f"must be a positive multiple of 32, got {self.block}"
        )
        require(self.bucket_cap_mb > 0, "bucket_cap_mb", f"must be > 0, got {self.bucket_cap_mb}")
        require(
            self.state_dtype in STATE_DTYPES,
            "state_dtype",
            f"must be one of {', '.join(STATE_DTYPES)}, got {self.state_dtype!r}",
        )
        require(
            not self.amsgrad,
            "amsgrad",
            "the AMSGrad variant is not supported by the compressed optimizers (DeepSpeed's did not support it either)",
        )

    @property
    def bucket_cap_numel(self) -> int:
        return max(1, int(self.bucket_cap_mb * 2**20) // 4)

    def trajectory(self) -> dict[str, Any]:
        """The fields a resumed run must share with its checkpoint (per-group ones travel in ``param_groups``)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.GROUP_KEYS}


def check_group(values: OptimizerConfig | Mapping[str, Any], where: str) -> None:
    """Validate the per-group hyperparameters of a config or of a ``param_groups`` entry (a dict)."""
    group: Mapping[str, Any] = values if isinstance(values, Mapping) else dataclasses.asdict(values)
    lr, betas, eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    require(lr >= 0, where + "lr", f"must be >= 0, got {lr}")
    require(
        len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas),
        where + "betas",
        f"must be two values in [0, 1), got {betas}",
    )
    require(eps > 0, where + "eps", f"must be > 0, got {eps}")
    require(wd >= 0, where + "weight_decay", f"must be >= 0, got {wd}")


def build(cls: type[C], values: Mapping[str, Any], what: str) -> C:
    """The optimizer's ``Config`` from keyword arguments, checked by :func:`distcomp.schema.build`.

    ``what`` names the optimizer in messages (``unknown key 'freez_step' for OneBitAdam ...``).
    """
    return schema.build(cls, values, where=f"for {what}")
