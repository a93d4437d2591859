"""Bad input to ``distcomp train`` and the compression configs: one clear error, before any rank starts.

Each case was once a raw traceback inside a rank, or accepted and then useless
(an infinite learning rate trains to NaN and exits 0). Single process: the
checks run while the config is read, or in the preflight that runs before any
rank is spawned.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import distcomp
from distcomp.errors import ConfigError
from distcomp.train.config import load_train_config
from distcomp.train.data import check_batches, load_corpus

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def test_a_config_that_is_not_utf8_names_the_file_and_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("version: 1\nname: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml is not UTF-8 text .* at byte 20.*save it as UTF-8"):
        load_train_config(path)
    with pytest.raises(ConfigError, match=r"compression config .*latin1\.yaml is not UTF-8"):
        distcomp.load_config(path)


def test_a_missing_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config .*nothing\.yaml"):
        load_train_config(tmp_path / "nothing.yaml")


@pytest.mark.parametrize(("override", "words"), [
    ("model.n_head=0", ["'n_head'", "must be >= 1, got 0"]),
    ("model.n_head=5", ["'n_head'", "must divide d_model=256"]),
    ("dist.timeout_s=.inf", ["'dist.timeout_s'", "finite number", "inf"]),
    ("dist.timeout_s=-.inf", ["'dist.timeout_s'", "finite number"]),
    ("optimizer.lr=.inf", ["'optimizer.lr'", "finite number"]),
    ("optimizer.grad_clip=.nan", ["'optimizer.grad_clip'", "finite number"]),
    ("optimizer.betas=[.inf,0.9]", ["'optimizer.betas[0]'", "finite number"]),
    ("optimizer.onebit_adam={lr: .inf}", ["'optimizer.onebit_adam.lr'", "finite number"]),
    ('name="run\\0x"', ["'name'", "NUL byte"]),
    ('log.dir="runs\\0x"', ["'log.dir'", "NUL byte"]),
    ('data.path="a\\0b"', ["'data.path'", "NUL byte"]),
    ('checkpoint.dir="ck\\0pt"', ["'checkpoint.dir'", "NUL byte"]),
])
def test_values_no_run_can_use_are_refused_with_the_key(override: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_train_config(QUICKSTART, [override])
    for word in words:
        assert word in str(info.value)


def test_a_nonfinite_compressor_option_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"'ratio'.*finite number"):
        distcomp.config_from_dict({"version": 1, "compressor": "topk", "ratio": float("inf")})


def test_a_batch_the_text_cannot_fill_names_the_largest_that_fits() -> None:
    cfg = load_train_config(QUICKSTART, ["data.batch_size=100000"])
    corpus = load_corpus(cfg.data, cfg.model.context)
    with pytest.raises(ConfigError, match=r"data\.batch_size: \d+ training windows .* 2 ranks x data\.batch_size "
                                          r"100000; use at most data\.batch_size=\d+"):
        check_batches(corpus, cfg.model.context, cfg.data.batch_size, 2)
    check_batches(corpus, cfg.model.context, 8, 2)  # the quickstart's own batch fits


@pytest.mark.slow
@pytest.mark.parametrize(("override", "words"), [
    ("data.batch_size=100000", ["data.batch_size", "use at most"]),
    ("dist.nproc=1000", ["dist.nproc", "1000", "CPU cores"]),
    ("dist.timeout_s=.inf", ["dist.timeout_s", "finite number"]),
])
def test_the_command_refuses_before_any_rank_starts(tmp_path: Path, override: str, words: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "distcomp", "train", str(QUICKSTART), "--quiet",
                           "--set", f"log.dir={tmp_path / 'runs'}", "--set", override],
                          capture_output=True, text=True, timeout=50, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    assert "rank" not in proc.stderr.split("error:")[0]  # no rank started, so none failed
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in proc.stderr


def test_a_summary_that_cannot_be_written_names_the_file_and_leaves_no_half_file(tmp_path: Path) -> None:
    from distcomp.train.telemetry import write_summary

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(OSError, match=r"cannot write the summary .*not-a-folder/run/summary\.json"):
        write_summary(blocker / "run" / "summary.json", {"a": 1})
    target = tmp_path / "summary.json"
    write_summary(target, {"a": 1})
    with pytest.raises(TypeError):
        write_summary(target, {"a": object()})  # not JSON: the earlier summary stays whole
    assert target.read_text() == '{\n  "a": 1\n}\n'


@pytest.mark.slow
def test_the_bad_input_probe_runs_and_classifies(tmp_path: Path) -> None:
    """``benchmarks/bad_inputs.py`` (the full probe, a few minutes) on a sample of its cases."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import bad_inputs
    finally:
        sys.path.remove(str(ROOT))
    bad_inputs.write_files(tmp_path)
    by_label = {c.label: c for c in bad_inputs.launch_cases(tmp_path) + bad_inputs.api_cases()}
    sample = ["--master-port 70000 --dry-run", "host name starting with -", "non-UTF-8 hostfile", "unknown compressor"]
    outcomes = [bad_inputs.run_case(by_label[label], tmp_path) for label in sample]
    assert [o.verdict for o in outcomes] == ["clear error"] * len(sample), bad_inputs.report(outcomes)
    assert "<tmp>" in outcomes[1].message and str(tmp_path) not in outcomes[1].message
    assert bad_inputs.report(outcomes).startswith("4 bad inputs: 4 clear error\n")
