"""``distcomp train`` end to end: real processes on gloo, each test under a hard timeout.

Every test runs the real command (``python -m distcomp train``) with a tiny model
and a handful of steps through ``--set``, the way CI shortens the quickstart.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distcomp import cli

pytestmark = pytest.mark.slow  # every test runs distcomp train

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
TINY = {"model.d_model": 32, "model.n_layer": 1, "model.n_head": 2, "model.context": 32, "eval.batches": 2,
        "eval.every": 0, "log.every": 1, "dist.timeout_s": 30}


def sets(values: dict[str, object]) -> list[str]:
    out: list[str] = []
    for key, value in values.items():
        out += ["--set", f"{key}={value}"]
    return out


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def run_cli(args: list[str], timeout: float = 120, **extra_env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "distcomp", *args], capture_output=True, text=True,
                          timeout=timeout, env=env(**extra_env), cwd=ROOT)
    assert "terminate called" not in proc.stderr
    return proc


def train(tmp_path: Path, config: str = QUICKSTART, *, extra: dict[str, object] | None = None,
          flags: tuple[str, ...] = ("--quiet",), timeout: float = 120, **extra_env: str) -> subprocess.CompletedProcess:
    values = {**TINY, "log.dir": tmp_path / "runs", **(extra or {})}
    return run_cli(["train", config, *flags, *sets(values)], timeout=timeout, **extra_env)


def summary(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / "runs" / name / "summary.json").read_text())


def test_quickstart_shortened_prints_the_summary_and_writes_tensorboard(tmp_path: Path) -> None:
    out = train(tmp_path, extra={"steps": 6}, flags=())  # with the progress bar
    assert out.returncode == 0, out.stderr
    table = out.stdout
    for row in ("final train loss", "final val loss", "steps/s", "mean step time", "sent per step",
                "compression ratio", "encode / comm time"):
        assert row in table
    header = next(line for line in table.splitlines() if line.strip().startswith("none"))
    assert header.split() == ["none", "powersgd"]
    assert "2 ranks (gloo, cpu)" in table
    # Loopback cannot show what compression buys: the predictor's rows do, labelled as predicted.
    rows = {line.split("  ")[0]: line.split() for line in table.splitlines() if line.startswith("predicted at")}
    assert list(rows) == ["predicted at 100 Mbit/s", "predicted at 1 Gbit/s", "predicted at 10 Gbit/s"]
    none_ms = {link: float(cells[4]) for link, cells in rows.items()}  # "predicted at L  N ms (1.0x)  ..."
    assert all(cells[6] == "(1.0x)" for cells in rows.values())  # the speedup is over the none run
    assert none_ms["predicted at 100 Mbit/s"] > none_ms["predicted at 1 Gbit/s"] >= none_ms["predicted at 10 Gbit/s"]
    assert "predicted: not measured here" in table
    runs = {r["compressor"]: r for r in summary(tmp_path, "quickstart")["runs"]}
    assert runs["none"]["ratio"] == pytest.approx(1.0)
    assert runs["powersgd"]["ratio"] > 2.0 and runs["powersgd"]["sent_bytes"] < runs["none"]["sent_bytes"]
    assert all(len(r["losses"]) == 6 and r["steps"] == 6 for r in runs.values())
    assert "powersgd: 100%" in out.stderr and "6/6" in out.stderr  # the progress bar ran

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in ("none", "powersgd"):
        acc = EventAccumulator(str(tmp_path / "runs" / "quickstart" / name))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        for tag in ("loss/train", "loss/val", "opt/lr", "time/step_ms", "comm/sent_bytes", "comm/ratio",
                    "time/encode_ms", "time/comm_ms", "comm/residual_norm"):
            assert tag in tags, (name, tag)
        losses = [e.value for e in acc.Scalars("loss/train")]
        assert [e.step for e in acc.Scalars("loss/train")] == list(range(6))
        assert losses == pytest.approx(runs[name]["losses"])
    ratios = [e.value for e in EventAccumulator(str(tmp_path / "runs" / "quickstart" / "powersgd")).Reload().Scalars("comm/ratio")]
    assert ratios[0] == pytest.approx(1.0) and ratios[-1] > 2.0  # exact warm-up steps, then compressed


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(tmp, config)``: an uninterrupted 8-step PowerSGD run named 'whole', with checkpoints at 4 and 8."""
    tmp = tmp_path_factory.mktemp("resume")
    cfg = tmp / "resume.yaml"
    cfg.write_text("version: 1\nsteps: 8\ncompression: {compressor: powersgd, rank: 2}\n"
                   "optimizer: {warmup_steps: 2}\ncheckpoint: {every: 4, keep: 0}\n")
    whole = train(tmp, str(cfg), extra={"name": "whole"})
    assert whole.returncode == 0, whole.stderr
    return tmp, cfg


def test_resumed_run_continues_the_same_loss_curve_bit_for_bit(checkpointed: tuple[Path, Path]) -> None:
    tmp, cfg = checkpointed
    first = tmp / "runs" / "whole" / "powersgd" / "checkpoints" / "step_000004"
    assert sorted(p.name for p in first.iterdir()) == ["manifest.json", "meta.json", "model.pt", "rank0.pt", "rank1.pt"]
    resumed = train(tmp, str(cfg), extra={"name": "resumed"}, flags=("--quiet", "--resume", str(first)))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    a, b = summary(tmp, "whole")["runs"][0], summary(tmp, "resumed")["runs"][0]
    assert a["losses"] == b["losses"] and a["val_losses"] == b["val_losses"]  # exactly, not approximately
    end = [tmp / "runs" / n / "powersgd" / "checkpoints" / "step_000008" / "model.pt" for n in ("whole", "resumed")]
    wa, wb = (torch.load(p, weights_only=True) for p in end)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_from_another_world_size_or_config_is_refused(checkpointed: tuple[Path, Path],
                                                                 capsys: pytest.CaptureFixture) -> None:
    tmp, cfg = checkpointed
    ckpts = tmp / "runs" / "whole" / "powersgd" / "checkpoints"  # a folder of checkpoints: the newest is used
    base = ["train", str(cfg), "--resume", str(ckpts), *sets({**TINY, "log.dir": tmp / "other"})]
    cases = [
        (["--set", "dist.nproc=1"], ["written by 2 ranks", "has 1", "dist.nproc=2"]),
        (["--set", "compression.rank=3"], ["another config", "compression.rank: 2 in the checkpoint, 3 now"]),
        (["--set", "model.d_model=64"], ["model.d_model: 32 in the checkpoint, 64 now"]),
        (["--set", "seed=1"], ["seed: 0 in the checkpoint, 1 now"]),
        (["--set", "data.batch_size=4"], ["data.batch_size: 8 in the checkpoint, 4 now"]),
        (["--set", "steps=5"], ["at step 8, beyond steps=5"]),
        (["--set", "compare=[none, powersgd]"], ["continues one run", "compare=[powersgd]"]),
        (["--set", "compare=[none]"], ["'powersgd' run, not 'none'"]),
    ]
    for extra, words in cases:
        assert cli.main(base + extra) == cli.EXIT_USAGE
        err = capsys.readouterr().err
        for word in words:
            assert word in err, (extra, err)
    assert cli.main(["train", str(cfg), "--resume", str(tmp)]) == cli.EXIT_USAGE
    assert "no checkpoint there" in capsys.readouterr().err
    assert not (tmp / "other").exists()  # refused before any rank started


@pytest.mark.parametrize("fault, words", [("1:3", ["injected fault", "rank 1 failed"]),
                                          ("1:3:hang", ["rank 0 failed", "dist.timeout_s = 5 s"])],
                         ids=["raises", "hangs"])
def test_a_failing_or_silent_rank_ends_the_job_with_its_error(tmp_path: Path, fault: str, words: list[str]) -> None:
    start = time.monotonic()
    out = train(tmp_path, extra={"steps": 50, "compare": "[]", "dist.timeout_s": 5}, DISTCOMP_TEST_FAULT=fault)
    assert out.returncode == 1
    for word in words:
        assert word in out.stderr
    assert "the other ranks were stopped" in out.stderr
    assert time.monotonic() - start < 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_under_a_launcher_a_failing_rank_makes_the_others_exit_within_the_timeout(tmp_path: Path) -> None:
    port = str(_free_port())
    args = [sys.executable, "-m", "distcomp", "train", QUICKSTART, "--quiet",
            *sets({**TINY, "steps": 50, "compare": "[]", "dist.timeout_s": 20, "log.dir": tmp_path / "runs"})]
    procs = [
        subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                                 MASTER_ADDR="127.0.0.1", MASTER_PORT=port, GLOO_SOCKET_IFNAME="lo",
                                 DISTCOMP_TEST_FAULT="1:3"))
        for r in range(2)
    ]
    start = time.monotonic()
    results = [p.communicate(timeout=90) for p in procs]
    assert time.monotonic() - start < 60
    assert [p.returncode for p in procs] == [1, 1]
    assert "injected fault" in results[1][1]
    assert "terminate called" not in results[0][1] + results[1][1]


def test_torchrun_job_is_joined_not_respawned(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "distcomp", "train", QUICKSTART, "--quiet",
            *sets({**TINY, "steps": 4, "compare": "[]", "dist.nproc": 5, "log.dir": tmp_path / "runs"})]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env(OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    assert "2 ranks (gloo, cpu)" in out.stdout  # torchrun's 2, not dist.nproc's 5
    assert out.stdout.count("final val loss") == 1  # only rank 0 prints
    assert "terminate called" not in out.stderr


def test_ctrl_c_stops_all_ranks_cleanly_and_prints_the_summary(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "distcomp", "train", QUICKSTART, "--quiet",
            *sets({**TINY, "steps": 100000, "compare": "[]", "log.dir": tmp_path / "runs"})]
    # A terminal delivers Ctrl-C to a command whose SIGINT is not ignored; a test run started in the background
    # (`cmd &` in a script) ignores SIGINT and its children would inherit that, so restore the default first.
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stderr:
            if "step 3/" in line:
                break
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        start = time.monotonic()
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - start < 30
    assert proc.returncode == 130, stderr
    assert "(interrupted)" in stdout and "final val loss" in stdout
    assert "terminate called" not in stderr and "Traceback" not in stderr


def test_resume_auto_starts_fresh_then_continues_from_the_newest_checkpoint(tmp_path: Path) -> None:
    cfg = tmp_path / "auto.yaml"
    cfg.write_text("version: 1\ncompression: {compressor: sign}\noptimizer: {warmup_steps: 1, decay_steps: 6}\n"
                   "checkpoint: {every: 2, keep: 0}\n")
    first = train(tmp_path, str(cfg), extra={"steps": 4}, flags=("--quiet", "--resume", "auto"))
    assert first.returncode == 0, first.stderr
    assert "--resume auto: no checkpoint yet" in first.stderr and "resumed from" not in first.stderr
    again = train(tmp_path, str(cfg), extra={"steps": 6}, flags=("--quiet", "--resume", "auto"))
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stderr and "step_000004 at step 4" in again.stderr
    run = summary(tmp_path, "auto")["runs"][0]
    assert run["steps"] == 6 and len(run["losses"]) == 6
    assert (tmp_path / "runs" / "auto" / "sign" / "checkpoints" / "step_000006").is_dir()
