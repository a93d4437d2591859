"""``distcomp train`` with ``dist.parallel: fsdp``: FSDP2 with a compressed reduce-scatter, checkpoints, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train import ROOT, TINY, sets, summary, train

from distcomp import cli

pytestmark = pytest.mark.slow  # real 2-rank distcomp train runs

FSDP_INT8 = str(ROOT / "configs" / "fsdp_int8.yaml")
SHAPE = {"model.n_layer": 2}  # two blocks: three FSDP units (each block and the model)


def test_fsdp_compare_trains_both_runs_and_writes_the_summary(tmp_path: Path) -> None:
    out = train(tmp_path, FSDP_INT8, extra={**SHAPE, "steps": 4})
    assert out.returncode == 0, out.stderr
    assert "int8 reduce-scatter on 3 FSDP modules" in out.stderr
    runs = {r["compressor"]: r for r in summary(tmp_path, "fsdp_int8")["runs"]}
    assert sorted(runs) == ["int8", "none"]
    for run in runs.values():
        assert len(run["losses"]) == 4 and all(torch.isfinite(torch.tensor(run["losses"])))
    assert runs["none"]["losses"][0] == runs["int8"]["losses"][0]  # same weights and data before any update
    assert summary(tmp_path, "fsdp_int8")["config"]["dist"]["parallel"] == "fsdp"


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 6-step FSDP int8 run named 'whole', with checkpoints after steps 3 and 6."""
    tmp = tmp_path_factory.mktemp("fsdp")
    out = train(tmp, FSDP_INT8, extra={**SHAPE, **RESUME, "name": "whole"})
    assert out.returncode == 0, out.stderr
    return tmp


RESUME = {"steps": 6, "compare": "[]", "checkpoint.every": 3, "checkpoint.keep": 0}


def test_fsdp_resume_continues_the_same_loss_curve_bit_for_bit(whole: Path) -> None:
    first = whole / "runs" / "whole" / "int8" / "checkpoints" / "step_000003"
    assert sorted(p.name for p in first.iterdir()) == ["manifest.json", "meta.json", "model.pt", "rank0.pt", "rank1.pt"]
    flags = ("--quiet", "--resume", str(first))
    out = train(whole, FSDP_INT8, extra={**SHAPE, **RESUME, "name": "resumed"}, flags=flags)
    assert out.returncode == 0, out.stderr
    assert f"resumed from {first} at step 3" in out.stderr
    a, b = summary(whole, "whole")["runs"][0], summary(whole, "resumed")["runs"][0]
    assert a["losses"] == b["losses"] and a["val_losses"] == b["val_losses"]  # exactly, not approximately
    end = [whole / "runs" / n / "int8" / "checkpoints" / "step_000006" / "model.pt" for n in ("whole", "resumed")]
    wa, wb = (torch.load(p, weights_only=True) for p in end)
    assert "blocks.1.fc.weight" in wa and not hasattr(wa["tok.weight"], "device_mesh")  # full, plain tensors
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fsdp_checkpoint_does_not_resume_a_ddp_run(whole: Path, capsys: pytest.CaptureFixture) -> None:
    ckpts = whole / "runs" / "whole" / "int8" / "checkpoints"
    args = ["train", FSDP_INT8, "--resume", str(ckpts), *sets({**TINY, **SHAPE, **RESUME, "log.dir": whole / "other"})]
    assert cli.main([*args, "--set", "dist.parallel=ddp"]) == cli.EXIT_USAGE
    assert "parallel: 'fsdp' in the checkpoint, None now" in capsys.readouterr().err
    assert not (whole / "other").exists()


REFUSALS = [
    (
        ["compare=[]", "compression.compressor=powersgd"],
        ["fsdp cannot compress its reduce-scatter with 'powersgd'", "use one of none, sign, int8", "dist.parallel=ddp"],
    ),
    (["compare=[none,powersgd]"], ["'powersgd'", "dist.parallel=ddp"]),
    (
        ["compare=[]", "compression.compressor=none", "optimizer.name=zero_one_adam"],
        ["fsdp cannot train with 'zero_one_adam'", "dist.parallel=ddp", "onebit_adam or onebit_lamb"],
    ),
    (["compare=[int8,zero_one_adam]"], ["cannot train with 'zero_one_adam'"]),
    (["dist.parallel=hsdp", "compare=[powersgd,onebit_lamb]"], ["hsdp cannot train with the compressed optimizer"]),
]


@pytest.mark.parametrize(("extra", "words"), REFUSALS)
def test_fsdp_refuses_what_it_cannot_train_before_any_rank_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], words: list[str]
) -> None:
    args = ["train", FSDP_INT8, *sets({**TINY, "log.dir": tmp_path / "runs"})]
    for value in extra:
        args += ["--set", value]
    assert cli.main(args) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "config key 'dist.parallel'" in err
    for word in words:
        assert word in err, err
    assert not (tmp_path / "runs").exists()


HSDP = {**SHAPE, **RESUME, "compare": "[powersgd]", "dist.parallel": "hsdp", "dist.shard": 1}  # 2 replicas of 1


def test_hsdp_trains_compressed_replicas_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    whole = train(tmp_path, FSDP_INT8, extra={**HSDP, "name": "whole"})
    assert whole.returncode == 0, whole.stderr
    first = tmp_path / "runs" / "whole" / "powersgd" / "checkpoints" / "step_000003"
    flags = ("--quiet", "--resume", str(first))
    resumed = train(tmp_path, FSDP_INT8, extra={**HSDP, "name": "resumed"}, flags=flags)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {first} at step 3" in resumed.stderr
    a, b = summary(tmp_path, "whole")["runs"][0], summary(tmp_path, "resumed")["runs"][0]
    assert a["compressor"] == "powersgd" and a["ratio"] > 2.0
    assert a["losses"] == b["losses"] and a["val_losses"] == b["val_losses"]


def test_hsdp_shard_that_does_not_divide_the_ranks_is_refused_before_any_rank_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["train", FSDP_INT8, *sets({**TINY, **HSDP, "dist.shard": 3, "log.dir": tmp_path / "runs"})]
    assert cli.main(args) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "dist.shard: 3 ranks per shard group do not divide the 2 ranks of this job" in err
    assert "--set dist.shard=2" in err
    assert not (tmp_path / "runs").exists()  # refused before the run directory was claimed


ONEBIT = {
    **SHAPE,
    **RESUME,
    "compare": "[onebit_adam]",
    "optimizer.onebit_adam.freeze_step": 2,
    "optimizer.onebit_adam.state_dtype": "int8",
}


def test_fsdp_onebit_adam_with_int8_state_trains_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    whole = train(tmp_path, FSDP_INT8, extra={**ONEBIT, "name": "whole"})
    assert whole.returncode == 0, whole.stderr
    assert "OneBitAdam drives the reduce-scatter of 3 FSDP modules" in whole.stderr
    first = tmp_path / "runs" / "whole" / "onebit_adam" / "checkpoints" / "step_000003"
    flags = ("--quiet", "--resume", str(first))
    resumed = train(tmp_path, FSDP_INT8, extra={**ONEBIT, "name": "resumed"}, flags=flags)
    assert resumed.returncode == 0, resumed.stderr
    a, b = summary(tmp_path, "whole")["runs"][0], summary(tmp_path, "resumed")["runs"][0]
    assert a["compressor"] == "onebit_adam" and a["ratio"] > 1.0
    assert a["losses"] == b["losses"] and a["val_losses"] == b["val_losses"]
    saved = torch.load(first / "rank1.pt", weights_only=True)  # shards as plain tensors, with the worker errors
    assert saved["optimizer"]["distcomp"]["fsdp"]["rank"] == 1
    assert all("lowbit" in bucket for bucket in saved["optimizer"]["distcomp"]["buckets"])
