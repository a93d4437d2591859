"""Checkpoints that verify themselves: a manifest, fallback past damaged ones, errors that name the file.

The checkpoints come from one real 2-rank ``distcomp train`` run; each test damages a copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest

from distcomp import cli
from distcomp.errors import CheckpointError
from distcomp.train import manifest
from test_train import QUICKSTART, TINY, sets, summary, train

pytestmark = pytest.mark.slow  # the module's run is a real distcomp train

RUN = {"name": "base", "compare": "[]", "checkpoint.every": 2, "checkpoint.keep": 0, "steps": 6}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log.dir's parent holding run 'base' with checkpoints after steps 2, 4 and 6."""
    tmp = tmp_path_factory.mktemp("ckpt")
    out = train(tmp, extra=RUN)
    assert out.returncode == 0, out.stderr
    return tmp


@pytest.fixture
def copy(written: Path, tmp_path: Path) -> Path:
    """This test's own copy of the run's checkpoints folder."""
    shutil.copytree(written / "runs", tmp_path / "runs")
    return tmp_path / "runs" / "base" / "powersgd" / "checkpoints"


def test_every_checkpoint_has_a_manifest_of_its_files(written: Path) -> None:
    folder = written / "runs" / "base" / "powersgd" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step_000002", "step_000004", "step_000006"]
    ids = set()
    for step in folder.iterdir():
        listed = json.loads((step / "manifest.json").read_text())["files"]
        assert sorted(listed) == ["meta.json", "model.pt", "rank0.pt", "rank1.pt"]
        for name, entry in listed.items():
            data = (step / name).read_bytes()
            assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        ids.add(json.loads((step / "meta.json").read_text())["run_id"])
    assert len(ids) == 1 and None not in ids  # one run, one id


def test_resume_auto_falls_back_past_a_damaged_newest_checkpoint_with_a_warning(copy: Path) -> None:
    rank1 = copy / "step_000006" / "rank1.pt"
    size = rank1.stat().st_size
    with open(rank1, "r+b") as f:
        f.truncate(size // 2)  # a copy cut short
    out = train(copy.parents[3], extra={**RUN, "steps": 8}, flags=("--quiet", "--resume", "auto"))
    assert out.returncode == 0, out.stderr
    assert (f"checkpoint {copy / 'step_000006'} is damaged (rank1.pt has {size // 2} bytes, the manifest says "
            f"{size} (cut short or overwritten)): skipping it") in out.stderr
    assert f"resumed from {copy / 'step_000004'} at step 4" in out.stderr
    assert len(summary(copy.parents[3], "base")["runs"][0]["losses"]) == 8


def _swap(step: Path) -> None:
    a, b = step / "rank0.pt", step / "rank1.pt"
    a.rename(step / "tmp")
    b.rename(a)
    (step / "tmp").rename(b)


DAMAGES = {
    "missing-rank": (lambda s: (s / "rank1.pt").unlink(), "rank1.pt", "rank1.pt is missing"),
    "swapped-ranks": (_swap, "rank0.pt", "rank0.pt does not match its sha256 in the manifest"),
    "foreign-rank": (lambda s: shutil.copy(s.parent / "step_000002" / "rank1.pt", s / "rank1.pt"), "rank1.pt",
                     "rank1.pt "),
    "truncated-model": (lambda s: (s / "model.pt").write_bytes((s / "model.pt").read_bytes()[:100]), "model.pt",
                        "model.pt has 100 bytes"),
    "bad-manifest": (lambda s: (s / "manifest.json").write_text("{not json"), "manifest.json",
                     "manifest.json is unreadable (JSONDecodeError"),
}


@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
def test_a_damaged_checkpoint_named_explicitly_is_refused_before_any_rank_starts(
        copy: Path, damage: tuple, capsys: pytest.CaptureFixture) -> None:
    harm, file, words = damage
    step = copy / "step_000004"
    harm(step)
    args = ["train", QUICKSTART, "--resume", str(step), *sets({**TINY, **RUN, "log.dir": copy.parents[3] / "other"})]
    assert cli.main(args) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert f"checkpoint file {step / file} is damaged: {words}" in err
    assert f"--resume {copy} takes the newest complete one" in err
    assert not (copy.parents[3] / "other").exists()  # refused before any rank started


def test_resume_folder_prefers_the_newest_verified_checkpoint(copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    (copy / "step_000006" / "meta.json").write_text("{}")
    (copy / "step_000004" / "manifest.json").unlink()  # as written before manifests existed
    with caplog.at_level(logging.WARNING, logger="distcomp.train"):
        assert manifest.resolve(copy) == copy / "step_000002"
    assert f"checkpoint {copy / 'step_000006'} is damaged (meta.json has 2 bytes" in caplog.text
    (copy / "step_000002" / "manifest.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distcomp.train"):
        assert manifest.resolve(copy) == copy / "step_000004"  # unverified ones when nothing verified is left
    assert f"checkpoint {copy / 'step_000004'} has no manifest.json (written by an older distcomp)" in caplog.text


def test_an_unverifiable_damaged_checkpoint_fails_naming_the_file(copy: Path) -> None:
    step = copy / "step_000004"
    (step / "manifest.json").unlink()
    model = step / "model.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    out = train(copy.parents[3], extra={**RUN, "name": "again"}, flags=("--quiet", "--resume", str(step)))
    assert out.returncode == 1, out.stderr
    assert "its files cannot be verified" in out.stderr
    assert f"CheckpointError: checkpoint file {model} is damaged (" in out.stderr
    assert "resume from an earlier checkpoint" in out.stderr


def test_loading_a_damaged_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "rank0.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"checkpoint file {path} is damaged"):
        manifest.load(path)


def test_resume_auto_with_every_checkpoint_damaged_does_not_send_the_user_round_again(
        copy: Path, capsys: pytest.CaptureFixture) -> None:
    for step in copy.iterdir():
        (step / "rank0.pt").unlink()
    args = ["train", QUICKSTART, "--resume", "auto", *sets({**TINY, **RUN, "log.dir": copy.parents[2]})]
    assert cli.main(args) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "none of them is complete (see the warnings above), so --resume auto cannot continue that run" in err
    assert "To continue that run: --resume auto" not in err
    assert "--overwrite" in err
    assert sorted(p.name for p in copy.iterdir()) == ["step_000002", "step_000004", "step_000006"]  # nothing moved
