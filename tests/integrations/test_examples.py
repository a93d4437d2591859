"""The scripts under examples/, run as a user runs them (torchrun, or Lightning's own launcher), for a few steps.

Each compressed run checkpoints the way its framework does and resumes in new
processes: the resumed run must end on the same parameters as the run it
continues, on every rank. A checkpoint stripped of its compression state must
say so in a warning, and then diverge.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # every test starts 2-process jobs

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
LOST = "the optimizer was resumed from a checkpoint but the powersgd compression state was not"
RESET = "rank 1 loads the optimizer state rank 0 wrote (reset_errors_from_other_ranks)"


def run(script: str, *args: str, torchrun: bool = True) -> str:
    """Run an example on 2 processes; return its output (stdout and stderr), failing on a non-zero exit."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd = [*(launcher if torchrun else [sys.executable]), str(EXAMPLES / script), *args]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "RANK")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**env, "PYTHONWARNINGS": "default"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def digests(report: Path) -> list[str]:
    """Each rank's digest of its final parameters; the ranks must agree."""
    found = [json.loads(Path(f"{report}.rank{r}").read_text())["digest"] for r in range(2)]
    assert found[0] == found[1], "ranks ended on different parameters"
    return found


def test_torchrun_ddp_single_file_resume(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    run("torchrun_ddp.py", "--steps", "8", "--save-at", "4", "--checkpoint", str(ckpt), "--report", f"{tmp_path}/a")
    saved = torch.load(ckpt, weights_only=True)["compression"]
    assert [entry["rank"] for entry in saved["ranks"]] == [0, 1], "rank 0's file holds every rank's state"
    out = run("torchrun_ddp.py", "--steps", "8", "--resume", str(ckpt), "--report", f"{tmp_path}/b")
    assert digests(tmp_path / "b") == digests(tmp_path / "a") and LOST not in out


def test_nanogpt_accumulation_resumes_one_bit_adam_from_rank_0s_file(tmp_path: Path) -> None:
    first = run("nanogpt_accumulation.py", "--iters", "12", "--out-dir", str(tmp_path))
    second = run("nanogpt_accumulation.py", "--iters", "24", "--out-dir", str(tmp_path), "--resume")
    assert RESET not in first and second.count(RESET) == 1, second[-3000:]
    loss = [float(line.split("loss")[1]) for line in (first + second).splitlines() if line.startswith("iter ")]
    assert len(loss) == 2 and loss[1] < loss[0], loss  # iters 10 and 20: still learning after the resume


def test_lightning_callback_resumes_exactly_from_ckpt_path(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    run("lightning_ddp.py", "--epochs", "3", "--out-dir", str(a), "--report", f"{tmp_path}/full", torchrun=False)
    epoch0 = a / "epoch=0.ckpt"
    out = run(
        "lightning_ddp.py",
        "--epochs",
        "3",
        "--out-dir",
        str(b),
        "--resume",
        str(epoch0),
        "--report",
        f"{tmp_path}/resumed",
        torchrun=False,
    )
    assert digests(tmp_path / "resumed") == digests(tmp_path / "full") and LOST not in out
    # The same checkpoint without the callback's state: a warning, and another trajectory.
    stripped = torch.load(epoch0, weights_only=False)
    del stripped["callbacks"]["Compression"]
    torch.save(stripped, tmp_path / "stripped.ckpt")
    out = run(
        "lightning_ddp.py",
        "--epochs",
        "3",
        "--out-dir",
        str(tmp_path / "c"),
        "--resume",
        str(tmp_path / "stripped.ckpt"),
        "--report",
        f"{tmp_path}/lost",
        torchrun=False,
    )
    assert LOST in out and digests(tmp_path / "lost") != digests(tmp_path / "full")


def test_lightning_with_one_bit_adam_from_configure_optimizers(tmp_path: Path) -> None:
    run(
        "lightning_ddp.py",
        "--epochs",
        "2",
        "--optimizer",
        "onebitadam",
        "--out-dir",
        str(tmp_path / "a"),
        "--report",
        f"{tmp_path}/a",
        torchrun=False,
    )
    out = run(
        "lightning_ddp.py",
        "--epochs",
        "3",
        "--optimizer",
        "onebitadam",
        "--out-dir",
        str(tmp_path / "b"),
        "--resume",
        str(tmp_path / "a" / "epoch=1.ckpt"),
        "--report",
        f"{tmp_path}/b",
        torchrun=False,
    )
    assert out.count(RESET) == 1, out[-3000:]
    assert digests(tmp_path / "b") != digests(tmp_path / "a")  # it trained on after the resume


def test_accelerate_example(tmp_path: Path) -> None:
    out = run("accelerate_ddp.py", "--steps", "6", "--report", f"{tmp_path}/a")
    digests(tmp_path / "a")
    sent = float(out.split(" sent ")[1].split("x")[0])
    assert sent > 1.5, out[-2000:]  # PowerSGD compressed the exchange


def test_hf_trainer_callback_resumes_exactly(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    run("hf_trainer.py", "--steps", "8", "--save-every", "4", "--out-dir", str(a), "--report", f"{tmp_path}/full")
    assert sorted(p.name for p in (a / "checkpoint-4").glob("distcomp_rank*.pt")) == [
        "distcomp_rank0.pt",
        "distcomp_rank1.pt",
    ]
    b.mkdir()
    shutil.copytree(a / "checkpoint-4", b / "checkpoint-4")  # the last checkpoint of b: resume_from_checkpoint=True
    out = run(
        "hf_trainer.py",
        "--steps",
        "8",
        "--save-every",
        "4",
        "--out-dir",
        str(b),
        "--resume",
        "--report",
        f"{tmp_path}/resumed",
    )
    assert digests(tmp_path / "resumed") == digests(tmp_path / "full") and LOST not in out

