"""A run directory belongs to one job; a new run never destroys what an earlier one wrote.

Real ``distcomp train`` processes on gloo (see test_train.py), each under a hard timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_train import QUICKSTART, ROOT, TINY, env, sets, train

pytestmark = pytest.mark.slow  # every test runs distcomp train

CKPT = {"compare": "[]", "checkpoint.every": 2, "checkpoint.keep": 0, "steps": 4}


def _files(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file under ``folder``."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def _previous(run_dir: Path) -> Path:
    (moved,) = list((run_dir / "previous").iterdir())
    return moved


def test_a_second_job_on_the_same_run_is_refused_naming_the_holder_until_it_dies(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "distcomp", "train", QUICKSTART, "--quiet",
            *sets({**TINY, "steps": 100000, "compare": "[]", "log.dir": tmp_path / "runs"})]
    first = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env(), start_new_session=True)
    try:
        for line in first.stderr:  # type: ignore[union-attr]
            if "step 2/" in line:
                break
        second = train(tmp_path, extra={"steps": 2, "compare": "[]"})
        assert second.returncode == 2, second.stderr
        assert "is in use by another distcomp train job" in second.stderr
        assert f"pid {first.pid}," in second.stderr and "--set name=" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a holder that dies without cleaning up
        first.communicate(timeout=30)
    third = train(tmp_path, extra={"steps": 2, "compare": "[]"})
    assert third.returncode == 0, third.stderr  # the dead job's lock blocks nothing
    run_dir = tmp_path / "runs" / "quickstart"
    holder = json.loads((run_dir / "distcomp.lock").read_text())
    assert holder["pid"] != first.pid and {"host", "started", "command"} <= holder.keys()
    assert any(p.name.startswith("events.out.tfevents") for p in _previous(run_dir).rglob("*"))


def test_a_fresh_run_over_an_earlier_runs_checkpoints_is_refused_and_overwrite_moves_them_aside(
        tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "quickstart"
    first = train(tmp_path, extra=CKPT)
    assert first.returncode == 0, first.stderr
    before = _files(run_dir)
    assert "powersgd/checkpoints/step_000004/model.pt" in before

    again = train(tmp_path, extra=CKPT)
    assert again.returncode == 2, again.stderr
    for words in ("holds checkpoints of an earlier run", "powersgd/checkpoints: 2 checkpoint(s), newest step_000004",
                  "--resume auto", "--overwrite", "nothing is deleted", "--set name=quickstart-2"):
        assert words in again.stderr, again.stderr
    assert _files(run_dir) == before  # refused before anything was touched

    over = train(tmp_path, extra=CKPT, flags=("--quiet", "--overwrite"))
    assert over.returncode == 0, over.stderr
    assert "an earlier run's files in" in over.stderr
    moved = _previous(run_dir)
    assert _files(moved) == {k: v for k, v in before.items() if k != "distcomp.lock"}  # all of it, intact
    assert (run_dir / "powersgd" / "checkpoints" / "step_000004" / "manifest.json").is_file()


def test_the_same_run_twice_without_checkpoints_moves_the_earlier_files_aside(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "quickstart"
    assert train(tmp_path, extra={"steps": 2, "compare": "[]"}).returncode == 0
    before = _files(run_dir)
    events = [k for k in before if "events.out.tfevents" in k]
    assert events and "summary.json" in before
    again = train(tmp_path, extra={"steps": 2, "compare": "[]"})
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("an earlier run's files in") == 1
    moved = _previous(run_dir)
    assert all(_files(moved)[k] == before[k] for k in events + ["summary.json"])  # kept, not deleted
    assert len(list((run_dir / "powersgd").glob("events.out.tfevents.*"))) == 1  # the new run's only


def test_pruning_never_deletes_a_checkpoint_of_another_run(tmp_path: Path) -> None:
    """A resumed run's folder holds another run's checkpoint at a step it writes and prunes past."""
    from distcomp.train import manifest

    assert train(tmp_path, extra={**CKPT, "steps": 6}).returncode == 0
    ckpts = tmp_path / "runs" / "quickstart" / "powersgd" / "checkpoints"
    other = ckpts / "step_000006"
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "run_id": "another-run"}))
    (other / "manifest.json").unlink()
    manifest.write_manifest(other)
    out = train(tmp_path, extra={**CKPT, "steps": 8, "checkpoint.keep": 1},
                flags=("--quiet", "--resume", str(ckpts / "step_000004")))
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_000008"]  # this run's newest only
    (kept,) = list((ckpts / "previous").iterdir())
    assert json.loads((kept / "meta.json").read_text())["run_id"] == "another-run"
    assert manifest.problem(kept) is None
    assert "belonged to another run" in out.stderr


def test_a_log_dir_that_cannot_be_written_is_refused_before_any_rank_starts(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = train(tmp_path, extra={"log.dir": blocker / "runs", "steps": 2, "compare": "[]"})
    assert out.returncode == 2, out.stderr
    assert f"log.dir: cannot write to {blocker / 'runs' / 'quickstart'}" in out.stderr
    assert "--set log.dir=PATH" in out.stderr and "Traceback" not in out.stderr
    assert "started 2 ranks" not in out.stderr
    with _tmpfs(tmp_path / "ro", "ro,size=64k") as mount:
        out = train(tmp_path, extra={"log.dir": mount, "steps": 2, "compare": "[]"})
        assert out.returncode == 2, out.stderr
        assert f"log.dir: cannot write to {mount / 'quickstart'} (Read-only file system)" in out.stderr


def test_a_full_disk_during_a_checkpoint_is_one_clear_error_naming_the_file(tmp_path: Path) -> None:
    # Room for the lock file, not for a checkpoint (about 1 MB with this model).
    with _tmpfs(tmp_path / "small", "size=256k") as mount:
        out = train(tmp_path, extra={**CKPT, "log.dir": mount, "log.tensorboard": "false"})
    assert out.returncode == 1, out.stderr
    assert "No space left on device (the disk is full" in out.stderr
    assert f"failed: CheckpointError: cannot write checkpoint file {mount}/quickstart/powersgd/checkpoints/" \
           "step_000002.tmp/" in out.stderr


def test_a_full_disk_during_tensorboard_writes_is_one_clear_error_naming_the_folder(tmp_path: Path) -> None:
    with _tmpfs(tmp_path / "small", "size=8k") as mount:
        out = train(tmp_path, extra={"log.dir": mount, "steps": 200, "compare": "[]"})
    assert out.returncode == 1, out.stderr
    assert f"cannot write TensorBoard events to {mount}/quickstart/powersgd: No space left on device" in out.stderr


@contextlib.contextmanager
def _tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A small tmpfs mounted at ``where`` for the test (root only); skips the test where mount is refused."""
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                          text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"needs permission to mount a tmpfs (mount -t tmpfs: {done.stderr.strip()})")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True, timeout=30)
