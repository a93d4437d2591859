"""The training config: nested frozen dataclasses, read from YAML and ``--set`` overrides.

A complete config can be as short as::

    version: 1
    compression:
      compressor: sign
      block: 2048

Every other section has defaults (a 3.3M-parameter byte-level GPT on the
``pydoc_data`` corpus that ships with Python, AdamW, 2 local ranks). The
``compression:`` section is a distcomp compression config (``compressor:`` plus
that compressor's options). Every section is checked and built by
:func:`distcomp.schema.build`: unknown keys anywhere are rejected with a message
naming the dotted key, its section and the keys allowed there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from distcomp.compressor import CompressorConfig
from distcomp.config import CONFIG_VERSION, check_version, compression_section, config_to_dict
from distcomp.errors import ConfigError
from distcomp.fsdp.register import SUPPORTED as FSDP_SUPPORTED
from distcomp.models.gpt import GPTConfig
from distcomp.optim import CompressedOptimizer, OneBitAdam, OneBitLamb, ZeroOneAdam
from distcomp.optim.config import OptimizerConfig as OptimizerSettings
from distcomp.registry import available_compressors, build_config, compressor_for_config
from distcomp.schema import build
from distcomp.validation import read_yaml_mapping, require


@dataclass(kw_only=True, frozen=True)
class DataConfig:
    """Where the text comes from and how it is batched."""

    path: str | None = None
    """A UTF-8 text file, or a folder whose files (recursively, hidden ones skipped) are read in name order.
    ``null``: the ``pydoc_data`` topics that ship with Python (about 460 KB of English; no download)."""
    val_fraction: float = 0.1
    """Share of the text, taken from its end, held out for validation."""
    batch_size: int = 8
    """Sequences of ``model.context`` bytes per rank per step."""

    def __post_init__(self) -> None:
        require(0.0 < self.val_fraction < 1.0, "val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


COMPRESSED_OPTIMIZERS: dict[str, type[CompressedOptimizer]] = {
    "onebit_adam": OneBitAdam,
    "zero_one_adam": ZeroOneAdam,
    "onebit_lamb": OneBitLamb,
}
"""distcomp's optimizers that compress their own momentum exchange, by ``optimizer.name``."""

FSDP_OPTIMIZERS = ("onebit_adam", "onebit_lamb")
"""The compressed optimizers that run on FSDP2-sharded parameters (0/1 Adam's local steps need whole ones)."""

SHARED_OPTIMIZER_KEYS = ("lr", "betas", "eps", "weight_decay")
"""Keys of the optimizer section that the compressed optimizers take too, unless their own section sets them."""


@dataclass(kw_only=True, frozen=True)
class OptimizerConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal["adamw", "sgd", "onebit_adam", "zero_one_adam", "onebit_lamb"] = "adamw"
    """``adamw`` (torch.optim.AdamW), ``sgd`` (SGD with momentum), or one of distcomp's compressed optimizers:
    ``onebit_adam``, ``zero_one_adam``, ``onebit_lamb`` (they communicate compressed momentum themselves, so the
    run has no ``compression`` hook; their options go in the section of the same name)."""
    lr: float = 2e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) or L2 penalty (SGD), applied to matrices only, not biases and norms."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's moment decay rates."""
    eps: float = 1e-8
    """AdamW's denominator epsilon."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """SGD with Nesterov momentum."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """After warm-up: cosine decay to ``min_lr_ratio * lr``, or constant."""
    warmup_steps: int = 10
    """Steps of linear warm-up from ``lr / warmup_steps`` to ``lr``."""
    decay_steps: int | None = None
    """Length of the cosine schedule; ``null``: the run's ``steps``. Set it to resume a run for longer
    with the same schedule."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine schedule, as a fraction of ``lr``."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off."""
    onebit_adam: OneBitAdam.Config | None = None
    """Options of ``onebit_adam`` (:class:`distcomp.optim.OneBitAdam`, DeepSpeed's key names), e.g.
    ``{freeze_step: 40}``. Keys left out (all of them when ``null``) take OneBitAdam's defaults, except ``lr``,
    ``betas``, ``eps`` and ``weight_decay``, which take this section's; ``lr`` set here is the peak of the same
    schedule."""
    zero_one_adam: ZeroOneAdam.Config | None = None
    """Options of ``zero_one_adam`` (:class:`distcomp.optim.ZeroOneAdam`), e.g. ``{var_freeze_step: 40,
    var_update_scaler: 32, local_step_scaler: 1000, local_step_clipper: 4}``; defaults as for ``onebit_adam``."""
    onebit_lamb: OneBitLamb.Config | None = None
    """Options of ``onebit_lamb`` (:class:`distcomp.optim.OneBitLamb`), e.g. ``{freeze_step: 40, lr: 2.0e-2}``
    (LAMB scales each step by the weights' norm and usually wants a larger ``lr`` than Adam); defaults as for
    ``onebit_adam``."""

    def __post_init__(self) -> None:
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(all(0.0 <= b < 1.0 for b in self.betas), "betas", f"must be two values in [0, 1), got {self.betas}")
        require(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        require(0.0 <= self.momentum < 1.0, "momentum", f"must be in [0, 1), got {self.momentum}")
        require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(self.decay_steps is None or self.decay_steps >= 1, "decay_steps", "must be >= 1 or null")
        require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        require(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")

    @property
    def compressed(self) -> bool:
        """Whether ``name`` is one of distcomp's compressed optimizers."""
        return self.name in COMPRESSED_OPTIMIZERS

    def peak_lr(self, name: str) -> float:
        """The peak learning rate of optimizer ``name`` (its own section's ``lr`` where set)."""
        return self.compressed_config(name).lr if name in COMPRESSED_OPTIMIZERS else self.lr

    def compressed_config(self, name: str) -> OptimizerSettings:
        """The ``Config`` of the compressed optimizer ``name``: its section, or its defaults with the shared keys."""
        own: OptimizerSettings | None = getattr(self, name)
        if own is not None:
            return own
        return COMPRESSED_OPTIMIZERS[name].Config(**{k: getattr(self, k) for k in SHARED_OPTIMIZER_KEYS})

    def section_base(self, name: str) -> OptimizerSettings:
        """What a compressed optimizer's section given in a file starts from (see :func:`distcomp.schema.build`)."""
        return self.compressed_config(name)


@dataclass(kw_only=True, frozen=True)
class DistConfig:
    """How ranks start and talk. Under ``torchrun`` (RANK/WORLD_SIZE set) the launcher decides the ranks."""

    nproc: int = 2
    """Local ranks to spawn when no launcher started this process."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: one GPU per rank when CUDA is available, else CPU."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """``auto``: NCCL on GPUs, gloo on CPU."""
    timeout_s: float = 300.0
    """Seconds any collective may block; a dead or failed peer becomes an error on the others after this."""
    overlap: bool = True
    """Run compression and communication on a worker thread, overlapping the backward pass (DDP only)."""
    parallel: Literal["ddp", "fsdp", "hsdp"] = "ddp"
    """``ddp``: every rank holds the whole model and DDP all-reduces compressed gradients. ``fsdp``: FSDP2
    (``fully_shard`` on each GPT block and the model, over all ranks) shards parameters, gradients and
    optimizer state, and ``distcomp.fsdp.register`` compresses its gradient reduce-scatter (compressors
    that cannot compress a reduce-scatter are refused), or ``onebit_adam`` / ``onebit_lamb`` run their 1-bit
    exchange inside it (``zero_one_adam`` is refused). ``hsdp``: FSDP2 inside
    groups of ``dist.shard`` ranks, replicated across the groups; the reduce-scatter stays exact and the
    replicas' all-reduce is compressed (any compressor; compressed optimizers are refused)."""
    shard: int = 0
    """``hsdp``: ranks per shard group (a (world size / shard, shard) mesh); 0: the ranks of one machine."""
    threads: int = 0
    """torch threads per rank; 0: the machine's cores divided by the local ranks (so ranks do not oversubscribe)."""
    stop_grace_s: float = 60.0
    """Seconds the ranks get after SIGINT, SIGTERM or SIGHUP to finish the step, checkpoint and write the summary.

    Past it they are killed. Keep it below what the scheduler allows (SLURM's KillWait, torchrun's
    ``--shutdown-timeout``, ``docker stop -t``), or ask it to signal ahead (``sbatch --signal=TERM@120``)."""

    def __post_init__(self) -> None:
        require(self.nproc >= 1, "nproc", f"must be >= 1, got {self.nproc}")
        require(self.stop_grace_s > 0, "stop_grace_s", f"must be > 0, got {self.stop_grace_s}")
        require(self.timeout_s > 0, "timeout_s", f"must be > 0, got {self.timeout_s}")
        require(self.threads >= 0, "threads", f"must be >= 0, got {self.threads}")
        require(self.shard >= 0, "shard", f"must be >= 0, got {self.shard}")
        require(not (self.device == "cpu" and self.backend == "nccl"), "backend", "nccl needs device cuda or auto")


@dataclass(kw_only=True, frozen=True)
class EvalConfig:
    """Validation loss."""

    every: int = 0
    """Evaluate every this many steps; 0: only at the end of the run."""
    batches: int = 8
    """Validation batches per rank per evaluation (the same sequences every time)."""

    def __post_init__(self) -> None:
        require(self.every >= 0, "every", f"must be >= 0, got {self.every}")
        require(self.batches >= 1, "batches", f"must be >= 1, got {self.batches}")


@dataclass(kw_only=True, frozen=True)
class LogConfig:
    """Progress bar, log lines and TensorBoard."""

    dir: str = "runs"
    """Runs go to ``<dir>/<name>/<compressor>/`` (TensorBoard events, checkpoints, summary.json)."""
    every: int = 10
    """A log line every this many steps when the progress bar is off."""
    progress: bool = True
    """A tqdm progress bar on rank 0 (``--quiet`` turns it off)."""
    tensorboard: bool = True
    """Write TensorBoard scalars every step (``tensorboard --logdir runs``)."""

    def __post_init__(self) -> None:
        require(self.every >= 1, "every", f"must be >= 1, got {self.every}")


@dataclass(kw_only=True, frozen=True)
class CheckpointConfig:
    """Periodic checkpoints (``--resume PATH`` continues from one)."""

    every: int = 0
    """Write a checkpoint every this many steps (and at the end, and on Ctrl-C); 0: never."""
    keep: int = 2
    """Most recent checkpoints kept per run; 0 keeps all."""
    dir: str | None = None
    """Checkpoints go to ``<dir>/<compressor>/``; ``null``: ``<log.dir>/<name>/<compressor>/checkpoints``.
    Every rank must see the same folder (a shared file system across hosts)."""

    def __post_init__(self) -> None:
        require(self.every >= 0, "every", f"must be >= 0, got {self.every}")
        require(self.keep >= 0, "keep", f"must be >= 0, got {self.keep}")


def _default_model() -> GPTConfig:
    return GPTConfig(d_model=256, n_layer=4, n_head=4, context=128)


def _default_compression() -> CompressorConfig:
    return build_config("powersgd", {})


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """Everything ``distcomp train`` needs; see ``configs/quickstart.yaml``."""

    name: str = "run"
    """Name of the run directory (``--set name=...``); defaults to the config file's stem."""
    seed: int = 0
    """Seeds model initialisation, data order and compressors' shared generators."""
    steps: int = 100
    """Optimizer steps per run."""
    compare: tuple[str, ...] = ()
    """Runs to train one after another and print side by side, e.g. ``[none, powersgd]``. A compressor name
    equal to ``compression.compressor`` gets that section's options; any other compressor gets its defaults.
    Entries may also name a compressed optimizer (``[none, onebit_adam]``): it trains with the optimizer
    section's settings, and the compressor runs then use ``adamw`` with the same ``lr``, ``betas``, ``eps``
    and ``weight_decay``. Empty: one run with ``compression`` and ``optimizer.name``."""
    model: GPTConfig = field(default_factory=_default_model)
    """Shape of the byte-level GPT (``vocab_size`` stays 256: tokens are bytes)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus and batch size."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and schedule."""
    compression: CompressorConfig = field(default_factory=_default_compression)
    """A compressor ``Config`` (``compressor: <name>`` plus its options); default PowerSGD rank 4."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Ranks, device, backend, timeouts."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Validation loss."""
    log: LogConfig = field(default_factory=LogConfig)
    """Progress, log lines, TensorBoard."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Periodic checkpoints."""

    def __post_init__(self) -> None:
        require(
            bool(self.name) and "/" not in self.name and self.name not in (".", ".."),
            "name",
            f"must be a plain directory name, got {self.name!r}",
        )
        require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        require(self.model.vocab_size == 256, "model.vocab_size", "must be 256: the model reads bytes")
        known = [*available_compressors(), *COMPRESSED_OPTIMIZERS]
        for name in self.compare:
            require(
                name in known,
                "compare",
                f"unknown compressor or compressed optimizer {name!r}; available: {', '.join(known)}",
            )
        require(len(set(self.compare)) == len(self.compare), "compare", f"lists a run twice: {list(self.compare)}")
        compressor_for_config(self.compression)  # raises unless it is a registered compressor's Config
        opt = self.optimizer.name
        require(
            not (self.optimizer.compressed and self.compare and opt not in self.compare),
            "compare",
            f"lists {list(self.compare)} but optimizer.name is {opt!r}, which would not run; add it "
            f"(--set compare=[none,{opt}]) or clear compare (--set compare=[])",
        )
        require(
            not (self.optimizer.compressed and not self.compare and self.compressor != "none"),
            "compression",
            f"optimizer {self.optimizer.name!r} communicates compressed momentum itself, so the gradients "
            f"cannot also go through the {self.compressor!r} hook; remove the compression section or "
            "set compression.compressor: none",
        )
        if self.dist.parallel != "ddp":
            self._check_fsdp()

    def _check_fsdp(self) -> None:
        """Refuse, before any rank starts, runs that FSDP cannot train."""
        for spec in self.runs():
            require(
                spec.optimizer not in COMPRESSED_OPTIMIZERS or spec.optimizer in FSDP_OPTIMIZERS,
                "dist.parallel",
                f"{self.dist.parallel} cannot train with {spec.optimizer!r}: its local steps update whole "
                "parameters between synchronisations; use --set dist.parallel=ddp, or optimizer.name "
                + " or ".join(FSDP_OPTIMIZERS),
            )
            require(
                not (spec.optimizer in COMPRESSED_OPTIMIZERS and self.dist.parallel == "hsdp"),
                "dist.parallel",
                f"hsdp cannot train with the compressed optimizer {spec.optimizer!r} yet (its exchange would cross "
                "both mesh dimensions); use --set dist.parallel=fsdp or ddp",
            )
            if self.dist.parallel == "hsdp" or spec.optimizer in COMPRESSED_OPTIMIZERS:
                continue  # hsdp's replica all-reduce takes any compressor; an optimizer sends its own 1-bit code
            name = compressor_for_config(spec.compression).name if spec.compression is not None else spec.name
            require(
                name in FSDP_SUPPORTED,
                "dist.parallel",
                f"fsdp cannot compress its reduce-scatter with {name!r}; use one of "
                f"{', '.join(FSDP_SUPPORTED)}, or --set dist.parallel=ddp",
            )

    @property
    def compressor(self) -> str:
        """Name of the compressor of the ``compression`` section."""
        return compressor_for_config(self.compression).name

    def runs(self) -> list[RunSpec]:
        """Every run, in order."""
        if not self.compare:
            return [self._run(self.optimizer.name if self.optimizer.compressed else self.compressor)]
        return [self._run(name) for name in self.compare]

    def _run(self, name: str) -> RunSpec:
        if name in COMPRESSED_OPTIMIZERS:
            return RunSpec(name=name, compression=None, optimizer=name)
        compression = self.compression if name == self.compressor else build_config(name, {})
        optimizer = "adamw" if self.optimizer.compressed else self.optimizer.name
        return RunSpec(name=name, compression=compression, optimizer=optimizer)


@dataclass(frozen=True)
class RunSpec:
    """One run of a job: what it is called, how DDP's gradients are compressed, which optimizer steps."""

    name: str
    """Label in the summary table and directory under ``<log.dir>/<config name>/``."""
    compression: CompressorConfig | None
    """The compressor ``Config`` of the DDP hook; None for a compressed optimizer, which registers its own hook."""
    optimizer: str
    """An ``optimizer.name`` value."""


# -- building from YAML -----------------------------------------------------------


def load_train_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML train config, apply ``key=value`` overrides, validate everything."""
    path = Path(path)
    raw = read_yaml_mapping(path, "config", "'version: 1' at its top")
    raw.setdefault("name", path.stem)
    apply_overrides(raw, overrides)
    return config_from_raw(raw, source=str(path))


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> None:
    """Apply ``a.b=value`` strings to ``raw`` in place; values are parsed with ``yaml.safe_load``.

    Setting ``compression.compressor`` starts that section afresh: options the file
    gave the old compressor are dropped (other ``--set compression.*`` still apply).
    """
    parsed = [_parse_override(o) for o in overrides]
    for keys, value in parsed:
        section = raw.get("compression")
        if keys == ["compression", "compressor"] and isinstance(section, dict) and section.get("compressor") != value:
            raw["compression"] = {}
    for keys, value in parsed:
        node = raw
        for i, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(keys)}: {'.'.join(keys[: i + 1])!r} is a value, not a section")
            node = child
        node[keys[-1]] = value


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, value = text.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(keys):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted KEY, e.g. --set compression.rank=8")
    try:
        return keys, yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML: {exc}") from None


def config_from_raw(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a :class:`TrainConfig` from plain values (a parsed YAML file); errors start with ``source``."""
    values = dict(raw)
    check_version(values.pop("version", None), source)
    if values.get("compression") is not None:
        values["compression"] = compression_section(values["compression"], source)
    elif _names_compressed_optimizer(values):
        values["compression"] = build_config("none", {})  # the default PowerSGD hook would contradict the optimizer
    else:
        values.pop("compression", None)
    try:
        return build(TrainConfig, values)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _names_compressed_optimizer(values: dict[str, Any]) -> bool:
    section = values.get("optimizer")
    return isinstance(section, dict) and section.get("name") in COMPRESSED_OPTIMIZERS


def config_to_raw(cfg: TrainConfig) -> dict[str, Any]:
    """Plain values (JSON/YAML-safe) that :func:`config_from_raw` turns back into ``cfg``."""
    out = dataclasses.asdict(cfg)
    out["compression"] = {k: v for k, v in config_to_dict(cfg.compression).items() if k != "version"}
    return {"version": CONFIG_VERSION, **_plain(out)}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
