"""The ``distcomp`` command line: ``info``, argument handling, errors before any rank starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distcomp import cli
from distcomp.train import launch as launch_mod

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "distcomp", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture
def no_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything tries to start or join ranks."""

    def forbidden(*args: object, **kwargs: object) -> int:
        raise AssertionError("a rank was started although the config is invalid")

    monkeypatch.setattr(launch_mod, "_spawn", forbidden)
    monkeypatch.setattr(launch_mod, "_join", forbidden)


@pytest.mark.slow
def test_info_lists_what_this_machine_offers() -> None:
    out = run_cli("info")
    assert out.returncode == 0, out.stderr
    for label in ("torch", "gloo", "nccl", "mpi backend", "cuda", "triton", "mpi4py", "kernels", "compressors"):
        assert any(line.startswith(label) for line in out.stdout.splitlines()), label
    assert torch.__version__ in out.stdout
    assert "reference" in out.stdout and "powersgd" in out.stdout


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["compression.rnk=8"], ["'compression.rnk'", "allowed keys", "rank"]),
        (["optimizer.name=lion"], ["'optimizer.name'", "'adamw'", "'sgd'"]),
        (["steps=-3"], ["'steps'", ">= 1"]),
        (["bogus=1"], ["'bogus'", "allowed keys"]),
    ],
)
def test_bad_set_stops_before_any_rank_starts(no_ranks: None, capsys: pytest.CaptureFixture, overrides: list[str],
                                              words: list[str]) -> None:
    argv = ["train", QUICKSTART]
    for o in overrides:
        argv += ["--set", o]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("distcomp train: error:")
    for word in words:
        assert word in err


def test_missing_config_and_missing_data_are_errors_before_ranks(no_ranks: None, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["train", str(tmp_path / "nope.yaml")]) == cli.EXIT_USAGE
    assert "cannot read config" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"version: 1\ndata:\n  path: {tmp_path / 'no-such-corpus'}\n")
    assert cli.main(["train", str(cfg)]) == cli.EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_bad_set_from_the_real_command_exits_2_quickly() -> None:
    start = time.monotonic()
    out = run_cli("train", QUICKSTART, "--set", "compression.rank=zero")
    assert out.returncode == 2
    assert "'compression.rank'" in out.stderr and "integer" in out.stderr
    assert "[distcomp rank" not in out.stderr  # no rank ever started
    assert time.monotonic() - start < 30


def test_device_and_quiet_flags_become_config_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_launch(cfg: object, resume: object) -> int:
        seen["cfg"], seen["resume"] = cfg, resume
        return 0

    monkeypatch.setattr(launch_mod, "launch", fake_launch)
    assert cli.main(["train", QUICKSTART, "--device", "cpu", "--quiet", "--resume", "x", "--set", "steps=7"]) == 0
    cfg = seen["cfg"]
    assert cfg.dist.device == "cpu" and cfg.log.progress is False and cfg.steps == 7 and seen["resume"] == "x"


def test_help_names_the_subcommands() -> None:
    help_text = cli.build_parser().format_help()
    assert "train" in help_text and "info" in help_text
