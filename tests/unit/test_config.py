"""Compressor registry and compression configs: unknown names, keys and bad values fail loudly."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

import distcomp
from distcomp import ConfigError
from distcomp.config import config_digest
from distcomp.schema import build

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BUILT_IN = ["bf16", "fp16", "int4", "int8", "none", "powersgd", "randomk", "sign", "topk"]

# A non-default value for some fields of each compressor, for round trips.
NON_DEFAULT: dict[str, dict[str, Any]] = {
    "none": {"start_step": 3},
    "fp16": {"start_step": 1},
    "bf16": {"start_step": 5},
    "powersgd": {"rank": 8, "warm_start": False, "min_compression_rate": 0.0, "batch_same_shape": True, "seed": 3},
    "topk": {"ratio": 0.2, "k": 17, "error_feedback": False},
    "randomk": {"ratio": 0.5, "seed": 9},
    "sign": {"block": 64, "start_step": 0},
    "int8": {"block": 32, "stochastic_rounding": False, "seed": 4},
    "int4": {"block": 96, "error_feedback": False},
}


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- registry ---------------------------------------------------------------------


def test_available_compressors_lists_the_built_ins_sorted() -> None:
    assert distcomp.available_compressors() == BUILT_IN


@pytest.mark.parametrize("name", BUILT_IN)
def test_get_compressor_by_name(name: str) -> None:
    cls = distcomp.get_compressor(name)
    assert issubclass(cls, distcomp.Compressor) and cls.name == name
    assert dataclasses.is_dataclass(cls.Config)


@pytest.mark.parametrize(
    "typo,suggestion",
    [("powersdg", "powersgd"), ("top-k", "topk"), ("int_8", "int8")],
    ids=["powersdg", "top-k", "int_8"],
)
def test_unknown_compressor_suggests_the_closest(typo: str, suggestion: str) -> None:
    with pytest.raises(
        ConfigError, match=rf"unknown compressor '{typo}' \(did you mean '{suggestion}'\?\); available: bf16, fp16"
    ):
        distcomp.get_compressor(typo)


def test_unknown_compressor_without_a_close_name_lists_them_all() -> None:
    with pytest.raises(ConfigError, match="available: " + ", ".join(BUILT_IN)) as info:
        distcomp.get_compressor("zzzzzz")
    assert "did you mean" not in str(info.value)


def test_registering_a_name_twice_fails() -> None:
    with pytest.raises(ValueError, match="'topk' is registered twice"):
        distcomp.register_compressor("topk")(type("Dup", (), {}))
    assert distcomp.get_compressor("topk").__name__ == "TopK"


# -- build_config -------------------------------------------------------------------


def test_unknown_key_names_the_key_and_the_allowed_keys() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown key 'rnak' for compressor 'powersgd' \(did you mean 'rank'\?\)"
    ) as info:
        distcomp.build_config("powersgd", {"rnak": 4})
    allowed = (
        "allowed keys: batch_same_shape, epsilon, error_feedback, min_compression_rate, rank, seed, start_step, "
        "warm_start"
    )
    assert allowed in str(info.value)


def test_unknown_key_for_an_option_free_compressor() -> None:
    with pytest.raises(ConfigError, match="unknown key 'rank' for compressor 'fp16'.*allowed keys: start_step"):
        distcomp.build_config("fp16", {"rank": 4})


@pytest.mark.parametrize(
    "name,key,value",
    [
        ("powersgd", "rank", 0),
        ("powersgd", "epsilon", -1.0),
        ("powersgd", "min_compression_rate", -0.5),
        ("powersgd", "start_step", -1),
        ("topk", "ratio", 2.0),
        ("topk", "ratio", 0.0),
        ("randomk", "k", 0),
        ("sign", "block", 10),
        ("sign", "block", 0),
        ("int8", "block", 10),
        ("int4", "block", 48),
        ("none", "start_step", -2),
    ],
    ids=[
        "rank0",
        "epsilon-neg",
        "rate-neg",
        "start-neg",
        "ratio2",
        "ratio0",
        "k0",
        "sign-block10",
        "sign-block0",
        "int8-block10",
        "int4-block48",
        "none-start-neg",
    ],
)
def test_bad_value_names_the_key(name: str, key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"config key '{key}': must be"):
        distcomp.build_config(name, {key: value})


@pytest.mark.parametrize(
    "name,key,value",
    [("powersgd", "rank", "4"), ("powersgd", "rank", 4.5), ("topk", "ratio", "0.1"), ("sign", "error_feedback", "no")],
    ids=["rank-str", "rank-float", "ratio-str", "bool-str"],
)
def test_value_of_the_wrong_type_names_the_key(name: str, key: str, value: Any) -> None:
    # A string from a hand-written config or a float rank must fail here, not at the
    # first compressed step (or never, for a truthy string in a boolean field).
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        distcomp.build_config(name, {key: value})


def test_good_values_build_a_frozen_config() -> None:
    cfg = distcomp.build_config("topk", {"k": 5, "start_step": 0})
    assert cfg.k == 5 and cfg.ratio == 0.01 and cfg.start_step == 0
    assert cfg.k_for(3) == 3 and cfg.k_for(100) == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 6


# -- the one builder (distcomp.schema.build) ------------------------------------------


@dataclasses.dataclass(kw_only=True, frozen=True)
class _Inner:
    size: int = 1
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"config key 'size': must be >= 1, got {self.size}")


@dataclasses.dataclass(kw_only=True, frozen=True)
class _Outer:
    name: str
    mode: Literal["a", "b"] = "a"
    limit: int | None = None
    pair: tuple[float, float] = (0.0, 1.0)
    names: tuple[str, ...] = ()
    inner: _Inner = dataclasses.field(default_factory=lambda: _Inner(size=4))
    extra: _Inner | None = None


def test_builder_converts_what_yaml_gives() -> None:
    cfg = build(_Outer, {"name": "x", "pair": [1, "2e-1"], "names": ["p", "q"], "inner": {"scale": 3}, "extra": {}})
    assert cfg == _Outer(name="x", pair=(1.0, 0.2), names=("p", "q"), inner=_Inner(size=4, scale=3.0), extra=_Inner())
    assert type(cfg.pair[0]) is float and type(cfg.inner.scale) is float
    assert build(_Outer, {"name": "x", "limit": None, "extra": None}) == _Outer(name="x")


@pytest.mark.parametrize(
    "values,message",
    [
        ({"name": "x", "mode": "c"}, "config key 'mode': must be one of 'a', 'b', got 'c'"),
        ({"name": "x", "limit": "3"}, "config key 'limit': must be an integer or null, got '3'"),
        ({"name": "x", "pair": [1.0]}, "config key 'pair': must be a list of 2 values, got [1.0]"),
        ({"name": "x", "pair": [1.0, "0.5"]}, "config key 'pair[1]': must be a number, got '0.5'"),
        ({"name": "x", "pair": [float("nan"), 1.0]}, "config key 'pair[0]': must be a finite number, got nan"),
        ({"name": "x", "names": "pq"}, "config key 'names': must be a list, got 'pq'"),
        ({"name": "x\0"}, "config key 'name': must not contain a NUL byte"),
        ({"name": True}, "config key 'name': must be a string, got True"),
        ({"name": "x", "inner": 3}, "config key 'inner': must be a mapping (a section), got 3"),
        (
            {"name": "x", "inner": {"sise": 2}},
            "unknown key 'inner.sise' in section 'inner' (did you mean 'size'?); allowed keys: scale, size",
        ),
        ({"name": "x", "inner": {"size": False}}, "config key 'inner.size': must be an integer, got False"),
        ({"name": "x", "inner": {"size": 0}}, "in section 'inner': config key 'size': must be >= 1, got 0"),
        ({"nmae": "x"}, "unknown key 'nmae' at the top level (did you mean 'name'?); allowed keys: extra, inner"),
        ({}, "config key 'name' is required; add it"),
        ([("name", "x")], "expected a mapping of keys to values"),
    ],
    ids=[
        "literal",
        "optional",
        "tuple-length",
        "float-string",
        "nan-element",
        "variadic",
        "nul",
        "str",
        "section",
        "section-key",
        "section-type",
        "section-post-init",
        "top-key",
        "required",
        "not-a-mapping",
    ],
)
def test_builder_names_the_dotted_key_and_what_is_accepted(values: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(_Outer, values)
    assert message in str(info.value)


def test_exponent_numbers_that_pyyaml_reads_as_strings_are_floats() -> None:
    assert yaml.safe_load("ratio: 1e-2") == {"ratio": "1e-2"}  # the reason for the rule
    assert distcomp.build_config("topk", {"ratio": "1e-2"}).ratio == 0.01
    assert distcomp.build_config("powersgd", {"epsilon": "+1.5E+3"}).epsilon == 1500.0
    for text in ("0.1", "1e", "e-3", "nan", "inf", "1e-3x"):
        with pytest.raises(ConfigError, match="must be a number"):
            distcomp.build_config("topk", {"ratio": text})


# -- config_to_dict / config_from_dict ------------------------------------------------


@pytest.mark.parametrize("overrides", ["default", "non-default"])
@pytest.mark.parametrize("name", BUILT_IN)
def test_dict_round_trip(name: str, overrides: str) -> None:
    values = NON_DEFAULT[name] if overrides == "non-default" else {}
    cfg = distcomp.build_config(name, values)
    raw = distcomp.config_to_dict(cfg)
    assert raw["version"] == 1 and raw["compressor"] == name
    assert yaml.safe_load(yaml.safe_dump(raw)) == raw  # plain values only
    back = distcomp.config_from_dict(raw)
    assert back == cfg and type(back) is type(cfg)


@pytest.mark.parametrize("name", BUILT_IN)
def test_yaml_file_round_trip(tmp_path: Path, name: str) -> None:
    cfg = distcomp.build_config(name, NON_DEFAULT[name])
    path = _write(tmp_path, yaml.safe_dump(distcomp.config_to_dict(cfg)))
    assert distcomp.load_config(path) == cfg


def test_config_to_dict_rejects_a_foreign_object() -> None:
    @dataclasses.dataclass
    class Other:
        rank: int = 4

    with pytest.raises(ConfigError, match="not the Config of a registered compressor"):
        distcomp.config_to_dict(Other())


def test_config_from_dict_errors() -> None:
    with pytest.raises(ConfigError, match=r"'version' must be 1 \(got None\)"):
        distcomp.config_from_dict({"compressor": "topk"})
    with pytest.raises(ConfigError, match="missing 'compressor'"):
        distcomp.config_from_dict({"version": 1, "rank": 4})
    with pytest.raises(ConfigError, match="unknown key 'rnak'"):
        distcomp.config_from_dict({"version": 1, "compressor": "powersgd", "rnak": 4})


def test_digest_tells_configs_apart() -> None:
    a = distcomp.build_config("powersgd", {"rank": 4})
    assert config_digest(a) == config_digest(distcomp.build_config("powersgd", {"rank": 4}))
    assert config_digest(a) != config_digest(distcomp.build_config("powersgd", {"rank": 8}))
    assert config_digest(a) != config_digest(a, overlap=True)


# -- load_config ------------------------------------------------------------------------


def test_load_flat_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "version: 1\ncompressor: topk\nratio: 0.05\nstart_step: 3\n")
    assert distcomp.load_config(path) == distcomp.get_compressor("topk").Config(ratio=0.05, start_step=3)


def test_load_training_config_section(tmp_path: Path) -> None:
    text = (
        "version: 1\nname: run\nsteps: 10\nmodel:\n  d_model: 32\n"
        "compression:\n  compressor: powersgd\n  rank: 2\n  start_step: 0\n"
    )
    cfg = distcomp.load_config(_write(tmp_path, text))
    assert cfg == distcomp.get_compressor("powersgd").Config(rank=2, start_step=0)


@pytest.mark.parametrize(
    "text,match",
    [
        ("compressor: topk\n", r"'version' must be 1 \(got None\); add 'version: 1'"),
        ("version: 2\ncompressor: topk\n", r"'version' must be 1 \(got 2\)"),
        ("version: '1'\ncompressor: topk\n", r"'version' must be 1 \(got '1'\)"),
        ("version: 1\ncompressor: topk\nratoi: 0.1\n", r"c\.yaml: unknown key 'ratoi'.*did you mean 'ratio'"),
        ("version: 1\ncompressor: topk\nratio: 2\n", r"c\.yaml: config key 'ratio'"),
        ("version: 1\ncompressor: topkk\n", r"unknown compressor 'topkk' \(did you mean 'topk'\?\)"),
        ("version: 1\nrank: 4\n", "missing 'compressor'"),
        ("- version: 1\n- compressor: topk\n", "expected a mapping"),
        ("just a string\n", "expected a mapping"),
        ("", "expected a mapping"),
        ("version: 1\ncompressor: [unclosed\n", "not valid YAML"),
        ("version: 1\ncompression: powersgd\n", "'compression' must be a mapping"),
        ("version: 1\ncompression:\n  rank: 4\n", r"missing 'compression\.compressor'"),
        ("compression:\n  compressor: powersgd\n", r"c\.yaml: 'version' must be 1 \(got None\)"),
        ("version: 3\ncompression:\n  compressor: powersgd\n", r"'version' must be 1 \(got 3\)"),
        (
            "version: 1\ncompression:\n  compressor: powersgd\n  rank: 0\n",
            r"in section 'compression': config key 'rank'",
        ),
        (
            "version: 1\ncompression:\n  compressor: sign\n  rank: 4\n",
            r"unknown key 'compression\.rank' for compressor 'sign'.*allowed keys: block",
        ),
    ],
    ids=[
        "missing-version",
        "wrong-version",
        "string-version",
        "unknown-key",
        "bad-value",
        "unknown-compressor",
        "missing-compressor",
        "list",
        "scalar",
        "empty",
        "bad-yaml",
        "section-not-mapping",
        "section-no-compressor",
        "section-missing-version",
        "section-wrong-version",
        "section-bad-value",
        "section-unknown-key",
    ],
)
def test_load_config_errors(tmp_path: Path, text: str, match: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as info:
        distcomp.load_config(path)
    assert str(path) in str(info.value), "the message names the file"


def test_load_config_does_not_evaluate_tags(tmp_path: Path) -> None:
    path = _write(tmp_path, "version: 1\ncompressor: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        distcomp.load_config(path)


# -- the presets in configs/ -----------------------------------------------------------


def _names_a_compressor(path: Path) -> bool:
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    return "compressor" in raw or "compression" in raw


# The compressed optimizers' train configs (configs/onebit_adam.yaml ...) have no compression section.
PRESETS = sorted(p for p in CONFIGS.glob("*.yaml") if _names_a_compressor(p))


def test_there_are_presets() -> None:
    assert len(PRESETS) >= len(BUILT_IN)


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_every_config_file_loads(path: Path) -> None:
    cfg = distcomp.load_config(path)
    assert distcomp.config_to_dict(cfg)["compressor"] in BUILT_IN


@pytest.mark.parametrize("name", BUILT_IN)
def test_each_compressor_has_a_preset_naming_all_its_options(name: str) -> None:
    path = CONFIGS / f"{name}.yaml"
    assert path.is_file(), f"configs/{name}.yaml is missing"
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert raw["version"] == 1 and isinstance(raw["compression"], dict)
    section = raw["compression"]
    assert section["compressor"] == name
    fields = {f.name for f in dataclasses.fields(distcomp.get_compressor(name).Config)}
    assert set(section) - {"compressor"} == fields
    assert type(distcomp.load_config(path)) is distcomp.get_compressor(name).Config


def test_a_train_config_without_compression_is_named_as_such() -> None:
    with pytest.raises(ConfigError) as info:
        distcomp.load_config(CONFIGS / "onebit_adam.yaml")
    assert "without a 'compression' section" in str(info.value) and "distcomp train" in str(info.value)
