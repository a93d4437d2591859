"""The train config (YAML, defaults, ``--set``), every preset in configs/, the schedule and the data shards.

Single process, no ranks: these run in seconds.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

import distcomp
from distcomp.docs import field_docs
from distcomp.errors import ConfigError
from distcomp.train import config as train_config
from distcomp.train.config import (
    RunSpec,
    TrainConfig,
    apply_overrides,
    config_from_raw,
    config_to_raw,
    load_train_config,
)
from distcomp.train.data import ShardedBatches, load_corpus, read_text, val_batches
from distcomp.train.optim import build_optimizer, first_compressed_step, lr_at

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- the shape of a config ------------------------------------------------------------


def test_compression_only_file_is_a_complete_config(tmp_path: Path) -> None:
    cfg = load_train_config(
        write(tmp_path, "version: 1\ncompression:\n  compressor: sign\n  block: 2048\n", "sign.yaml")
    )
    assert cfg.compressor == "sign" and cfg.compression.block == 2048
    assert cfg.name == "sign"  # the file's stem
    assert cfg.runs() == [RunSpec(name="sign", compression=cfg.compression, optimizer="adamw")]
    assert cfg.model.d_model == 256 and cfg.data.path is None and cfg.dist.nproc == 2


def test_version_alone_gives_the_defaults(tmp_path: Path) -> None:
    cfg = load_train_config(write(tmp_path, "version: 1\n"))
    assert cfg == TrainConfig(name="cfg")
    assert cfg.compressor == "powersgd" and cfg.compression.rank == 4


@pytest.mark.parametrize("text", ["compression: {compressor: none}\n", "version: 2\n", "- 1\n"])
def test_version_1_is_required(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="version"):
        load_train_config(write(tmp_path, text))


@pytest.mark.parametrize(
    "text, words",
    [
        ("stpes: 3", ["'stpes'", "did you mean 'steps'", "top level", "allowed keys", "compare"]),
        ("optimizer: {lrr: 0.1}", ["'optimizer.lrr'", "section 'optimizer'", "allowed keys", "warmup_steps"]),
        ("model: {width: 8}", ["'model.width'", "d_model", "n_layer"]),
        ("compression: {compressor: powersgd, rnk: 2}", ["'compression.rnk'", "powersgd", "allowed keys", "rank"]),
        ("compression: {compressor: zip}", ["unknown compressor 'zip'", "powersgd", "sign"]),
    ],
)
def test_unknown_keys_name_the_key_section_and_allowed_keys(tmp_path: Path, text: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_train_config(write(tmp_path, f"version: 1\n{text}\n"))
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize(
    "override, words",
    [
        ("optimizer.name=adam", ["'optimizer.name'", "'adamw'", "'sgd'", "'adam'"]),
        ("steps=0", ["'steps'", ">= 1"]),
        ("steps=many", ["'steps'", "integer", "'many'"]),
        ("data.batch_size=2.5", ["'data.batch_size'", "integer"]),
        ("model.n_head=3", ["section 'model'", "'n_head'", "must divide"]),
        ("dist.device=tpu", ["'dist.device'", "'auto'", "'cpu'", "'cuda'"]),
        ("compare=[none, zip]", ["'compare'", "'zip'", "available"]),
        ("compression.rank=0", ["rank", ">= 1"]),
        ("compression.rank=zero", ["'compression.rank'", "integer", "'zero'"]),
        ("compression.warm_start=1", ["'compression.warm_start'", "true or false"]),
        ("log.progress=maybe", ["'log.progress'", "true or false"]),
        ("steps.max=3", ["steps", "not a section"]),
        ("nonsense", ["KEY=VALUE"]),
    ],
)
def test_bad_overrides_name_the_key_and_what_is_allowed(tmp_path: Path, override: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_train_config(ROOT / "configs" / "quickstart.yaml", [override])
    for word in words:
        assert word in str(err.value), str(err.value)


def test_overrides_reach_nested_fields_and_parse_yaml_values() -> None:
    cfg = load_train_config(
        ROOT / "configs" / "quickstart.yaml",
        ["compression.rank=8", "steps=200", "optimizer.lr=1e-3", "compare=[none, sign]", "data.path=/x", "name=abc"],
    )
    assert cfg.compression.rank == 8 and cfg.steps == 200 and cfg.optimizer.lr == 1e-3
    assert cfg.compare == ("none", "sign") and cfg.data.path == "/x" and cfg.name == "abc"
    # sign is compared but the section configures powersgd: sign runs with its defaults.
    assert [r.name for r in cfg.runs()] == ["none", "sign"]
    assert cfg.runs()[1].compression == distcomp.build_config("sign", {})


def test_setting_the_compressor_starts_its_section_afresh() -> None:
    cfg = load_train_config(
        ROOT / "configs" / "quickstart.yaml", ["compression.compressor=topk", "compression.ratio=1e-2"]
    )
    assert cfg.compressor == "topk" and cfg.compression.ratio == 0.01
    raw = {"compression": {"compressor": "topk", "ratio": 0.5}}
    apply_overrides(raw, ["compression.compressor=topk"])  # the same compressor keeps its options
    assert raw["compression"]["ratio"] == 0.5


def test_a_partial_section_keeps_the_train_defaults() -> None:
    cfg = config_from_raw({"version": 1, "model": {"n_layer": 1}})
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head) == (1, 256, 4)


def test_config_round_trips_through_plain_values() -> None:
    cfg = load_train_config(
        ROOT / "configs" / "quickstart.yaml", ["compare=[none, topk]", "optimizer.betas=[0.8, 0.9]"]
    )
    assert config_from_raw(config_to_raw(cfg)) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_file_loads_and_validates(path: Path) -> None:
    cfg = load_train_config(path)
    assert cfg.name == path.stem or path.name == "quickstart.yaml"
    for spec in cfg.runs():
        if spec.compression is None:
            assert spec.optimizer == spec.name and cfg.optimizer.compressed_config(spec.name) is not None
        else:
            assert distcomp.get_compressor(spec.name).Config is type(spec.compression)
    assert config_from_raw(config_to_raw(cfg)) == cfg


def test_quickstart_compares_powersgd_rank_4_with_none_on_2_ranks() -> None:
    cfg = load_train_config(ROOT / "configs" / "quickstart.yaml")
    assert [r.name for r in cfg.runs()] == ["none", "powersgd"]
    assert cfg.compression.rank == 4 and cfg.dist.nproc == 2
    params = sum(p.numel() for p in distcomp.models.gpt.GPT(cfg.model).parameters())
    assert params > 3_000_000


# -- schedule and optimizers ------------------------------------------------------------------


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    cfg = config_from_raw({"version": 1, "optimizer": {"lr": 1.0, "warmup_steps": 4, "min_lr_ratio": 0.1}}).optimizer
    assert [lr_at(cfg, s, 100) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert math.isclose(lr_at(cfg, 100, 100), 0.1) and lr_at(cfg, 50, 100) < 1.0
    const = config_from_raw({"version": 1, "optimizer": {"schedule": "constant", "warmup_steps": 0}}).optimizer
    assert lr_at(const, 77, 100) == const.lr


@pytest.mark.parametrize(
    "name, cls",
    [
        ("adamw", torch.optim.AdamW),
        ("sgd", torch.optim.SGD),
        ("onebit_adam", distcomp.optim.OneBitAdam),
        ("zero_one_adam", distcomp.optim.ZeroOneAdam),
        ("onebit_lamb", distcomp.optim.OneBitLamb),
    ],
)
def test_optimizers_decay_matrices_only(name: str, cls: type) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    cfg = config_from_raw({"version": 1, "optimizer": {"name": name, "weight_decay": 0.1}}).optimizer
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, cls)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


# -- data ---------------------------------------------------------------------------------------


def test_bundled_corpus_needs_no_download() -> None:
    text, source = read_text(None)
    assert len(text) > 400_000 and "pydoc_data" in source


def test_ranks_read_disjoint_shards_and_batches_are_a_function_of_the_step() -> None:
    corpus = load_corpus(config_from_raw({"version": 1}).data, context=32)
    cpu = torch.device("cpu")
    shards = [ShardedBatches(corpus.train, 32, 4, rank, 2, seed=0) for rank in range(2)]
    for shard in shards:
        x, y = shard.batch(0, cpu)
        assert x.shape == y.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])
    # DistributedSampler semantics: each epoch, the ranks' windows are disjoint.
    order = [list(shard._order) for shard in shards]
    assert not set(order[0]) & set(order[1]) and len(order[0]) == len(order[1])
    assert torch.equal(shards[1].batch(2, cpu)[0], shards[1].windows[order[1][8:12], :-1].long())
    # A fresh reader gives the same batch for the same step, in a later epoch too.
    step = shards[0].steps_per_epoch + 3
    again = ShardedBatches(corpus.train, 32, 4, 0, 2, seed=0)
    assert torch.equal(again.batch(step, cpu)[0], shards[0].batch(step, cpu)[0])
    assert not torch.equal(shards[0].batch(3, cpu)[0], shards[0].batch(step, cpu)[0])
    vals = [val_batches(corpus.val, 32, 4, 2, rank, 2) for rank in range(2)]
    assert len(vals[0]) == 2 and not torch.equal(vals[0][0], vals[1][0])


def test_data_path_reads_a_folder_of_utf8_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("héllo " * 200)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("world " * 200)
    (tmp_path / ".hidden").write_bytes(b"\xff\xfe")
    text, source = read_text(str(tmp_path))
    assert text.startswith("héllo") and "world" in text and "2 files" in source


def test_unusable_data_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_text(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        read_text(str(tmp_path / "missing"))
    small = write(tmp_path, "tiny text", "small.txt")
    with pytest.raises(ConfigError, match="too few"):
        load_corpus(config_from_raw({"version": 1, "data": {"path": str(small)}}).data, context=128)


def test_every_train_config_field_has_a_docstring() -> None:
    sections = [
        train_config.TrainConfig,
        train_config.DataConfig,
        train_config.OptimizerConfig,
        train_config.DistConfig,
        train_config.EvalConfig,
        train_config.LogConfig,
        train_config.CheckpointConfig,
    ]
    for cls in sections:
        missing = {f.name for f in dataclasses.fields(cls)} - set(field_docs(cls))
        assert not missing, (cls.__name__, missing)


# -- compressed optimizers ---------------------------------------------------------------


def test_a_compressed_optimizer_is_one_run_without_a_hook() -> None:
    cfg = config_from_raw(
        {
            "version": 1,
            "optimizer": {
                "name": "onebit_adam",
                "lr": 1e-3,
                "betas": [0.9, 0.99],
                "onebit_adam": {"freeze_step": 7, "block": 64},
            },
        }
    )
    assert cfg.compressor == "none"  # the default PowerSGD hook would contradict the optimizer
    assert cfg.runs() == [RunSpec(name="onebit_adam", compression=None, optimizer="onebit_adam")]
    opt_cfg = cfg.optimizer.compressed_config("onebit_adam")
    assert (opt_cfg.freeze_step, opt_cfg.block, opt_cfg.lr, opt_cfg.betas) == (7, 64, 1e-3, (0.9, 0.99))
    opt = build_optimizer(torch.nn.Linear(3, 3), cfg.optimizer)
    assert isinstance(opt, distcomp.optim.OneBitAdam) and opt.config == opt_cfg


def test_a_compressed_optimizer_may_set_its_own_peak_lr() -> None:
    cfg = config_from_raw({"version": 1, "optimizer": {"lr": 2e-3, "warmup_steps": 2, "onebit_lamb": {"lr": 2e-2}}})
    assert cfg.optimizer.peak_lr("onebit_lamb") == 2e-2 and cfg.optimizer.peak_lr("onebit_adam") == 2e-3
    assert cfg.optimizer.peak_lr("adamw") == 2e-3
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg.optimizer, "onebit_lamb")
    assert all(g["lr"] == 2e-2 for g in opt.param_groups)
    assert lr_at(cfg.optimizer, 0, 10, peak=2e-2) == 1e-2 and lr_at(cfg.optimizer, 0, 10) == 1e-3


def test_compressed_optimizer_sections_are_typed_configs_over_the_shared_keys() -> None:
    raw = {
        "version": 1,
        "optimizer": {
            "lr": 3e-3,
            "betas": [0.8, 0.9],
            "weight_decay": 0.1,
            "onebit_adam": {"freeze_step": 5, "eps": 1e-6},
            "onebit_lamb": {"lr": 2e-2, "weight_decay": 0.0},
        },
    }
    opt = config_from_raw(raw).optimizer
    assert isinstance(opt.onebit_adam, distcomp.optim.OneBitAdam.Config) and opt.zero_one_adam is None
    adam, lamb = opt.compressed_config("onebit_adam"), opt.compressed_config("onebit_lamb")
    assert (adam.lr, adam.betas, adam.eps, adam.weight_decay, adam.freeze_step) == (3e-3, (0.8, 0.9), 1e-6, 0.1, 5)
    assert (lamb.lr, lamb.betas, lamb.weight_decay) == (2e-2, (0.8, 0.9), 0.0)
    zero_one = opt.compressed_config("zero_one_adam")  # no section: the optimizer's defaults with the shared keys
    assert zero_one == distcomp.optim.ZeroOneAdam.Config(lr=3e-3, betas=(0.8, 0.9), weight_decay=0.1)
    assert first_compressed_step(opt, "onebit_adam") == 5 and first_compressed_step(opt, "zero_one_adam") == 0
    assert first_compressed_step(opt, "adamw") == 0
    cfg = config_from_raw(raw)
    assert config_from_raw(config_to_raw(cfg)) == cfg


def test_a_bad_shared_key_is_named_in_its_own_section_not_in_the_optimizers() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_raw({"version": 1, "optimizer": {"lr": -1, "onebit_adam": {"freeze_step": 5}}})
    assert "in section 'optimizer': config key 'lr': must be > 0" in str(err.value)


def test_compare_mixes_compressors_and_compressed_optimizers() -> None:
    cfg = config_from_raw(
        {"version": 1, "compare": ["none", "powersgd", "zero_one_adam"], "optimizer": {"name": "zero_one_adam"}}
    )
    runs = cfg.runs()
    assert [(r.name, r.optimizer) for r in runs] == [
        ("none", "adamw"),
        ("powersgd", "adamw"),
        ("zero_one_adam", "zero_one_adam"),
    ]
    assert runs[1].compression == distcomp.build_config("powersgd", {}) and runs[2].compression is None
    sgd = config_from_raw({"version": 1, "compare": ["none", "onebit_lamb"], "optimizer": {"name": "sgd"}})
    assert [r.optimizer for r in sgd.runs()] == ["sgd", "onebit_lamb"]


def test_options_of_a_compressed_optimizer_are_set_from_the_command_line() -> None:
    cfg = load_train_config(
        ROOT / "configs" / "onebit_adam.yaml",
        ["optimizer.onebit_adam.freeze_step=3", "optimizer.zero_one_adam.var_update_scaler=8"],
    )
    assert cfg.optimizer.compressed_config("onebit_adam").freeze_step == 3
    assert cfg.optimizer.compressed_config("zero_one_adam").var_update_scaler == 8


@pytest.mark.parametrize(
    "optimizer, words",
    [
        (
            {"name": "onebit_adam", "onebit_adam": {"freez_step": 5}},
            ["section 'optimizer.onebit_adam'", "'optimizer.onebit_adam.freez_step'", "did you mean 'freeze_step'"],
        ),
        ({"onebit_adam": {"lr": -0.1}}, ["section 'optimizer.onebit_adam'", "'lr'", ">= 0"]),
        (
            {"zero_one_adam": {"var_freeze_step": "soon"}},
            ["'optimizer.zero_one_adam.var_freeze_step'", "integer", "'soon'"],
        ),
        ({"onebit_lamb": {"min_coeff": 0}}, ["section 'optimizer.onebit_lamb'", "'min_coeff'", "> 0"]),
        ({"onebit_lamb": 3}, ["'optimizer.onebit_lamb'", "mapping"]),
        ({"name": "onebit_adam", "onebit_adam": {"amsgrad": True}}, ["'amsgrad'", "not supported"]),
    ],
)
def test_bad_compressed_optimizer_options_name_the_key(optimizer: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_raw({"version": 1, "optimizer": optimizer})
    for word in words:
        assert word in str(err.value), str(err.value)


def test_a_compressed_optimizer_left_out_of_compare_is_an_error() -> None:
    with pytest.raises(ConfigError) as err:
        load_train_config(ROOT / "configs" / "quickstart.yaml", ["optimizer.name=onebit_adam"])
    assert "'onebit_adam', which would not run" in str(err.value) and "compare=[none,onebit_adam]" in str(err.value)


def test_a_compressed_optimizer_refuses_a_compression_hook() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_raw({"version": 1, "optimizer": {"name": "onebit_lamb"}, "compression": {"compressor": "sign"}})
    assert "'onebit_lamb' communicates compressed momentum itself" in str(err.value)
    assert "compression.compressor: none" in str(err.value)
