"""``distcomp train`` with the compressed optimizers: real ranks on gloo, shortened configs from ``configs/``.

Each optimizer trains a tiny GPT past its warm-up into its compressed phase,
with checkpoints; a second job resumes from the middle checkpoint and must
follow the same loss curve bit for bit (the worker and server errors are in
the per-rank checkpoints).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_train import ROOT, summary, train

pytestmark = pytest.mark.slow  # every test runs distcomp train

SHORT = {"steps": 10, "checkpoint.every": 5, "checkpoint.keep": 0, "optimizer.warmup_steps": 2}
OPTIONS = {
    "onebit_adam": {"optimizer.onebit_adam.freeze_step": 4},
    "zero_one_adam": {"optimizer.zero_one_adam.var_freeze_step": 4, "optimizer.zero_one_adam.var_update_scaler": 1,
                      "optimizer.zero_one_adam.local_step_scaler": 2, "optimizer.zero_one_adam.local_step_clipper": 2},
    "onebit_lamb": {"optimizer.onebit_lamb.freeze_step": 4},
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_compressed_optimizer_trains_compresses_and_resumes_bit_for_bit(tmp_path: Path, name: str) -> None:
    config = str(ROOT / "configs" / f"{name}.yaml")
    extra = {**SHORT, **OPTIONS[name], "compare": f"[{name}]"}
    whole = train(tmp_path, config, extra={**extra, "name": "whole"})
    assert whole.returncode == 0, whole.stderr
    run = summary(tmp_path, "whole")["runs"][0]
    assert run["compressor"] == name and run["steps"] == 10
    # In the compressed phase each rank sends signs plus one fp32 scale per block: far below an fp32 all-reduce
    # (25x here, where padding to whole blocks weighs on a 30K-parameter model; about 31x on real ones).
    assert run["ratio"] > 20, run
    assert all(torch.isfinite(torch.tensor(run["losses"])))

    middle = tmp_path / "runs" / "whole" / name / "checkpoints" / "step_000005"
    resumed = train(tmp_path, config, extra={**extra, "name": "resumed"}, flags=("--quiet", "--resume", str(middle)))
    assert resumed.returncode == 0, resumed.stderr
    again = summary(tmp_path, "resumed")["runs"][0]
    assert again["losses"] == run["losses"] and again["val_losses"] == run["val_losses"]
    end = [tmp_path / "runs" / n / name / "checkpoints" / "step_000010" / "model.pt" for n in ("whole", "resumed")]
    wa, wb = (torch.load(p, weights_only=True) for p in end)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_compare_prints_adamw_and_the_compressed_optimizer_side_by_side(tmp_path: Path) -> None:
    out = train(tmp_path, str(ROOT / "configs" / "onebit_adam.yaml"),
                extra={"steps": 6, "optimizer.warmup_steps": 2, "optimizer.onebit_adam.freeze_step": 3})
    assert out.returncode == 0, out.stderr
    header = next(line for line in out.stdout.splitlines() if line.strip().startswith("none"))
    assert header.split() == ["none", "onebit_adam"]
    runs = {r["compressor"]: r for r in summary(tmp_path, "onebit_adam")["runs"]}
    assert runs["none"]["ratio"] == pytest.approx(1.0) and runs["onebit_adam"]["ratio"] > 20
    assert "OneBitAdam: step 3: warm-up done" in out.stderr


def test_a_run_too_short_to_compress_is_warned_about(tmp_path: Path) -> None:
    out = train(tmp_path, str(ROOT / "configs" / "onebit_lamb.yaml"),
                extra={"steps": 2, "compare": "[onebit_lamb]", "optimizer.onebit_lamb.freeze_step": 50})
    assert out.returncode == 0, out.stderr
    assert "onebit_lamb compresses from step 50" in out.stderr and "only run its exact warm-up" in out.stderr
