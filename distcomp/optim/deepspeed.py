"""Build a distcomp optimizer from a DeepSpeed config, for users of DeepSpeed's removed 1-bit optimizers.

    opt = distcomp.optim.from_deepspeed_config("ds_config.json", model.parameters())

Only the ``optimizer`` section is read::

    "optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-4, "freeze_step": 23000, "cuda_aware": false,
                                                   "comm_backend_name": "nccl"}}

``type`` is matched without regard to case, as DeepSpeed does (``OneBitAdam``,
``OnebitAdam``, ``ZeroOneAdam``, ``OneBitLamb``, ``OnebitLamb``). Every key of
``params`` is an option of the matching optimizer under the same name, except
``cuda_aware`` and ``comm_backend_name``, which select DeepSpeed's transports
and are ignored with one warning. Unknown keys fail, naming the allowed ones.

The config is read as DeepSpeed reads it: files and strings with hjson (so
comments and trailing commas are fine), and an absent ``bias_correction`` means
no bias correction, which is what DeepSpeed's 1-bit optimizers did whatever the
key said (they stored it and never applied it); one warning says so, and an
explicit ``true`` (applied here, ignored by DeepSpeed) is warned too. The
sections DeepSpeed applied around the optimizer (``gradient_clipping``,
``fp16``, ``scheduler``, ``zero_optimization``, ...) are not applied here; one
warning lists those the config switches on, with what to do instead. An
absent ``gradient_clipping`` is no clipping: DeepSpeed's code defaults it to 0
(its config page says 1.0). Values must have their types: DeepSpeed handed them
to torch unchanged, so a string such as ``"1e-4"`` or ``"auto"`` fails here,
naming the key; a key given twice fails, as DeepSpeed refused it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import hjson
import torch.distributed as dist

from distcomp.errors import ConfigError
from distcomp.optim.adam import OneBitAdam
from distcomp.optim.base import CompressedOptimizer
from distcomp.optim.lamb import OneBitLamb
from distcomp.optim.zoadam import ZeroOneAdam
from distcomp.schema import check_keys

logger = logging.getLogger("distcomp.optim")

OPTIMIZERS: dict[str, type[CompressedOptimizer]] = {
    "onebitadam": OneBitAdam,
    "zerooneadam": ZeroOneAdam,
    "onebitlamb": OneBitLamb,
}
"""DeepSpeed's lower-cased ``optimizer.type`` names and the distcomp optimizer for each."""

TRANSPORT_KEYS = ("cuda_aware", "comm_backend_name")
TRANSPORT_NOTE = (
    "distcomp communicates through torch.distributed on the backend init_process_group chose (gloo, NCCL, ...), "
    "so there is no MPI/NCCL/HCCL/compressed transport to select and no CUDA-aware MPI to configure"
)
IGNORED_KEYS = ("legacy_fusion",)
"""Keys of ``optimizer`` (beside ``type`` and ``params``) that DeepSpeed accepted and that change nothing here."""


def from_deepspeed_config(
    config: dict[str, Any] | str | Path,
    params: Iterable[Any],
    *,
    process_group: dist.ProcessGroup | None = None,
    log_every: int = 0,
) -> CompressedOptimizer:
    """The optimizer a DeepSpeed config's ``optimizer`` section describes, over ``params``.

    ``config`` is a dict, a JSON string or the path of a JSON file.
    """
    raw = _read(config)
    section = raw.get("optimizer")
    if not isinstance(section, dict):
        raise ConfigError("DeepSpeed config: no 'optimizer' section (expected {'type': ..., 'params': {...}})")
    try:
        check_keys(section, ("type", "params", *IGNORED_KEYS), "", "in 'optimizer'")
    except ConfigError as exc:
        raise ConfigError(f"DeepSpeed config: {exc}") from None
    name = section.get("type")
    cls = OPTIMIZERS.get(str(name).lower())
    if cls is None:
        raise ConfigError(
            f"DeepSpeed config: optimizer type {name!r} is not a compressed optimizer distcomp provides; "
            "expected one of OneBitAdam, ZeroOneAdam, OneBitLamb"
        )
    given = section.get("params")
    if not isinstance(given, (dict, type(None))):
        raise ConfigError(f"DeepSpeed config: 'optimizer.params' must be a mapping, got {given!r}")
    options = dict(given or {})
    if "max_grad_norm" in options:
        raise ConfigError(
            "DeepSpeed config: 'max_grad_norm' is not an optimizer option (DeepSpeed refused it too); "
            "clip with torch.nn.utils.clip_grad_norm_ before optimizer.step()"
        )
    dropped = [k for k in TRANSPORT_KEYS if options.pop(k, None) is not None]
    if dropped:
        logger.warning("%s: ignoring DeepSpeed option(s) %s: %s", cls.algorithm, ", ".join(dropped), TRANSPORT_NOTE)
    _check_strings(options, cls.algorithm)
    if "bias_correction" not in options:
        options["bias_correction"] = False
        logger.warning("%s: %s", cls.algorithm, BIAS_CORRECTION_NOTE)
    for key in ("bias_correction", "eps_inside_sqrt"):
        if options.get(key) is True:
            logger.warning("%s: %s", cls.algorithm, APPLIED_NOTE.format(key=key))
    unapplied = _unapplied(raw)
    if unapplied:
        logger.warning(
            "%s: DeepSpeed config sections not applied by distcomp (only 'optimizer' is read):\n  %s",
            cls.algorithm,
            "\n  ".join(unapplied),
        )
    try:
        return cls(params, process_group=process_group, log_every=log_every, **options)
    except ConfigError as exc:
        raise ConfigError(f"DeepSpeed config, optimizer {cls.algorithm}: {exc}") from None


BIAS_CORRECTION_NOTE = (
    "no 'bias_correction' in the config: not applying bias correction, as DeepSpeed's 1-bit optimizers did "
    "(they stored the key and never applied it, so a DeepSpeed run trained without it); add "
    '"bias_correction": true to the optimizer\'s params to apply it'
)
APPLIED_NOTE = (
    '"{key}": true is applied here, but DeepSpeed\'s 1-bit optimizers ignored it (a DeepSpeed run trained '
    "without it): set it to false to reproduce such a run"
)
STRING_KEYS = ("state_dtype",)
"""Options whose values are strings; any other string value is an error."""

SECTIONS = {
    "fp16": "use torch.autocast and torch.amp.GradScaler (a step with inf/NaN gradients is skipped on every rank)",
    "bf16": "use torch.autocast(dtype=torch.bfloat16)",
    "scheduler": "use a torch.optim.lr_scheduler on the optimizer",
    "zero_optimization": "shard with FSDP2 (fully_shard) and distcomp.optim.register, or not at all",
    "prescale_gradients": "nothing to do: distcomp averages the gradients itself",
    "gradient_predivide_factor": "nothing to do: distcomp averages the gradients itself",
    "train_batch_size": "set the batch size in your data loader",
    "train_micro_batch_size_per_gpu": "set the batch size in your data loader",
    "gradient_accumulation_steps": "accumulate with DDP's no_sync() before the step",
    "pipeline": "DeepSpeed applied it to a PipelineModule only; distcomp trains data-parallel models",
}
"""Sections DeepSpeed applied around the optimizer, and what to do instead."""
INACTIVE = {
    "fp16": lambda v: isinstance(v, dict) and not v.get("enabled", False),
    "bf16": lambda v: isinstance(v, dict) and not v.get("enabled", False),
    "zero_optimization": lambda v: isinstance(v, dict) and not v.get("stage", 0),
    "prescale_gradients": lambda v: v is False,
    "gradient_predivide_factor": lambda v: v == 1.0,
    "gradient_accumulation_steps": lambda v: v == 1,
}
"""Values with which a section changes nothing in DeepSpeed (``enabled: false``, ZeRO stage 0, ...): not reported."""


def _check_strings(options: dict[str, Any], algorithm: str) -> None:
    """A string where a number or boolean belongs fails here, naming the key (DeepSpeed passed it on as is)."""
    for key, value in options.items():
        if isinstance(value, str) and key not in STRING_KEYS:
            hint = (
                "'auto' is filled in by the HF Trainer / Accelerate DeepSpeed integration, not by DeepSpeed; "
                "give the value"
                if value.strip().lower() == "auto"
                else "write it without quotes"
            )
            raise ConfigError(
                f"DeepSpeed config, optimizer {algorithm}: 'optimizer.params.{key}' is the string {value!r}; {hint}"
            )


def _unapplied(raw: dict[str, Any]) -> list[str]:
    """One line per section of ``raw`` that DeepSpeed would have applied and distcomp does not."""
    # Absent means 0, no clipping: DeepSpeed's GRADIENT_CLIPPING_DEFAULT (its config page's 1.0 was never the code's).
    clip = raw.get("gradient_clipping", 0)
    lines = []
    if clip:
        lines.append(
            f"gradient_clipping ({clip}): call torch.nn.utils.clip_grad_norm_(model.parameters(), {clip}) "
            "before optimizer.step() to match DeepSpeed"
        )
    active = [key for key in SECTIONS if key in raw and not INACTIVE.get(key, lambda v: False)(raw[key])]
    return lines + [f"{key}: {SECTIONS[key]}" for key in active]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's keys, refusing one given twice (DeepSpeed's reader refused it; JSON would keep the last)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"DeepSpeed config: key {key!r} is given twice in one object; keep one")
        seen[key] = value
    return seen


def _read(config: dict[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(config, dict):
        return config
    text = str(config)
    try:
        source = text if text.lstrip().startswith("{") else Path(text).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read DeepSpeed config {text}: {exc.strerror}") from None
    try:
        # hjson, as DeepSpeed reads its configs: JSON plus comments and trailing commas.
        raw = json.loads(json.dumps(hjson.loads(source, object_pairs_hook=_no_duplicates)))
    except ConfigError:
        raise
    except (ValueError, hjson.HjsonDecodeError) as exc:
        raise ConfigError(f"DeepSpeed config {text[:60]!r}: not valid JSON (or hjson): {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError("DeepSpeed config: expected a JSON object at the top")
    return raw
