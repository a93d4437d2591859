"""Compressed optimizers in one process: schedules, configs, DeepSpeed configs, checkpoints, dtypes.

Multi-rank behaviour (the reference comparison, DDP, GradScaler, resume in new
processes) is in ``test_optim_ranks.py``.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
import torch.nn as nn

import distcomp.optim as optim
from distcomp.errors import CheckpointError, ConfigError
from distcomp.optim import functional as F
from optim_tasks import OPTIMIZERS, OPTIONS, batch, loss_of, make_model

ALGORITHMS = list(OPTIMIZERS)


def _train(net: nn.Module, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        x, y = batch(0, step)
        opt.zero_grad(set_to_none=True)
        loss = loss_of(net(x.to(next(net.parameters()).dtype)), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _groups(net: nn.Module, lr2: float = 0.005, wd2: float = 0.0) -> list[dict]:
    mats = [p for p in net.parameters() if p.dim() == 2]
    vecs = [p for p in net.parameters() if p.dim() < 2]
    return [{"params": mats}, {"params": vecs, "lr": lr2, "weight_decay": wd2}]


# -- the math against torch and DeepSpeed ------------------------------------------------


def test_warmup_is_bit_identical_to_adamw_with_param_groups() -> None:
    net, ref = make_model(), make_model()
    opt = optim.OneBitAdam(_groups(net), lr=0.02, weight_decay=0.1, freeze_step=6)
    adamw = torch.optim.AdamW(_groups(ref), lr=0.02, weight_decay=0.1)
    _train(net, opt, range(6))
    _train(ref, adamw, range(6))
    for a, b in zip(net.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert opt.phase() == "compressed"


def test_l2_mode_is_bit_identical_to_adam() -> None:
    net, ref = make_model(), make_model()
    opt = optim.OneBitAdam(net.parameters(), lr=0.02, weight_decay=0.1, adam_w_mode=False, freeze_step=5)
    _train(net, opt, range(5))
    _train(ref, torch.optim.Adam(ref.parameters(), lr=0.02, weight_decay=0.1), range(5))
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), ref.parameters()))


def _deepspeed_variance_steps(steps: int, scaler: int) -> list[bool]:
    """DeepSpeed's ZeroOneAdam counters (``var_interval``, ``var_counter``), replayed."""
    interval, counter, out = 1, 0, []
    for s in range(1, steps + 1):
        update = s % interval == 0
        out.append(update)
        if update:
            counter += 1
            if counter == scaler:
                counter, interval = 0, interval * 2
    return out


def _deepspeed_sync_steps(first: int, steps: int, scaler: int, clipper: int) -> list[bool]:
    interval, counter, out = 1, 0, []
    for s in range(first, first + steps):
        out.append(s % interval == 0)
        counter += 1
        if counter == scaler:
            counter, interval = 0, min(clipper, interval * 2)
    return out


@pytest.mark.parametrize("scaler", [1, 2, 3, 16])
def test_variance_schedule_matches_deepspeed_counters(scaler: int) -> None:
    want = _deepspeed_variance_steps(3000, scaler)
    assert [F.zero_one_variance_step(s, scaler) for s in range(1, 3001)] == want
    counts = torch.tensor(want).cumsum(0).tolist()
    assert [F.zero_one_variance_updates(s, scaler) for s in range(1, 3001)] == counts


@pytest.mark.parametrize("scaler,clipper", [(1, 4), (3, 16), (5, 2)])
def test_local_step_schedule_matches_deepspeed_counters(scaler: int, clipper: int) -> None:
    tv = 7
    want = _deepspeed_sync_steps(tv + 1, 500, scaler, clipper)
    assert [F.zero_one_is_sync(t, tv, scaler, clipper) for t in range(tv, tv + 500)] == want


def test_phases_follow_the_step_counter() -> None:
    opt = optim.ZeroOneAdam(make_model().parameters(), var_freeze_step=6, var_update_scaler=2, local_step_scaler=2,
                            local_step_clipper=4)
    phases = [opt.phase(t) for t in range(14)]
    assert phases == ["variance", "variance", "compressed-gradient", "variance", "compressed-gradient", "variance",
                      "sync", "sync", "local", "sync", "local", "sync", "local", "local"]
    assert [opt.gradient_mode(t) for t in range(4)] == ["mean", "mean", "local", "mean"]
    one = optim.OneBitAdam(make_model().parameters(), freeze_step=3)
    assert [one.phase(t) for t in range(5)] == ["warmup"] * 3 + ["compressed"] * 2


def test_lamb_factor_is_clipped() -> None:
    kw = dict(factor_min=0.5, factor_max=4.0, factor_threshold=0.1)
    assert F.lamb_frozen_factor(10.0, 0, 1, 0.0, last_factor=1.0, **kw) == pytest.approx(1.1)
    assert F.lamb_frozen_factor(0.1, 0, 1, 0.0, last_factor=0.52, **kw) == pytest.approx(0.5)
    assert F.lamb_frozen_factor(2.0, 1.0, 2.0, 0.1, last_factor=1.5, **kw) == pytest.approx(1.5)  # half of 2 + 0.5
    assert F.lamb_trust_ratio(0.0, 1.0, 0.01, 10.0) is None
    assert F.lamb_trust_ratio(100.0, 1.0, 0.01, 10.0) == 10.0
    assert F.momentum_scaling([1.0, 3.0, 0.0]) == [2.0, pytest.approx(2 / 3), 1.0]


# -- options and DeepSpeed configs ----------------------------------------------------------


@pytest.mark.parametrize("options,key", [
    ({"freeze_stepp": 3}, "freeze_stepp"),
    ({"freeze_step": 0}, "freeze_step"),
    ({"betas": (0.9, 1.0)}, "betas"),
    ({"block": 48}, "block"),
    ({"amsgrad": True}, "amsgrad"),
    ({"cuda_aware": False}, "cuda_aware"),
])
def test_bad_options_name_the_key(options: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        optim.OneBitAdam(make_model().parameters(), **options)


def test_bad_group_values_are_refused() -> None:
    net = make_model()
    with pytest.raises(ConfigError, match="param_groups"):
        optim.OneBitLamb([{"params": list(net.parameters()), "eps": 0.0}])


DS = {
    "train_batch_size": 16,
    "fp16": {"enabled": True},
    "optimizer": {"type": "OneBitAdam", "params": {"lr": 2e-4, "weight_decay": 0.01, "bias_correction": False,
                                                   "freeze_step": 23000, "cuda_aware": False,
                                                   "comm_backend_name": "nccl"}},
}


@pytest.mark.parametrize("name,cls", [("OneBitAdam", optim.OneBitAdam), ("OnebitAdam", optim.OneBitAdam),
                                      ("ZeroOneAdam", optim.ZeroOneAdam), ("onebitlamb", optim.OneBitLamb),
                                      ("OnebitLamb", optim.OneBitLamb)])
def test_deepspeed_type_names(name: str, cls: type) -> None:
    assert type(optim.from_deepspeed_config({"optimizer": {"type": name}}, make_model().parameters())) is cls


def test_deepspeed_config_maps_options_and_warns_once(caplog: pytest.LogCaptureFixture, tmp_path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(DS))
    for source in (DS, str(path), json.dumps(DS)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="distcomp.optim"):
            opt = optim.from_deepspeed_config(source, make_model().parameters())
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2 and "cuda_aware, comm_backend_name" in warnings[0]
        assert "torch.distributed" in warnings[0]
        # The sections DeepSpeed applied around the optimizer, each with what to do instead.
        # No gradient_clipping key: DeepSpeed's code default is 0 (no clipping), whatever its config page says.
        assert "gradient_clipping" not in warnings[1] and "fp16: use torch.autocast" in warnings[1]
        assert "train_batch_size" in warnings[1] and "scheduler" not in warnings[1]
        assert opt.config.freeze_step == 23000 and opt.param_groups[0]["lr"] == 2e-4
        assert opt.param_groups[0]["bias_correction"] is False and opt.param_groups[0]["weight_decay"] == 0.01


def test_deepspeed_config_is_read_as_deepspeed_reads_it(caplog: pytest.LogCaptureFixture, tmp_path) -> None:
    # DeepSpeed's 1-bit Adam tutorial config as printed there: a trailing comma (and here a comment), read by hjson.
    path = tmp_path / "ds.json"
    path.write_text(
        '{\n  "train_batch_size": 4096,\n  "gradient_clipping": 0.5, // clip\n'
        '  "optimizer": {"type": "OneBitAdam", "params": {"lr": 4e-4, "freeze_step": 23000,},},\n}\n'
    )
    with caplog.at_level(logging.WARNING, logger="distcomp.optim"):
        opt = optim.from_deepspeed_config(str(path), make_model().parameters())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # No bias_correction key: DeepSpeed never applied it, so neither does distcomp, and it says so once.
    assert opt.param_groups[0]["bias_correction"] is False and opt.config.freeze_step == 23000
    assert sum("no 'bias_correction'" in w and '"bias_correction": true' in w for w in warnings) == 1
    assert any("gradient_clipping (0.5)" in w and "clip_grad_norm_(model.parameters(), 0.5)" in w
               for w in warnings)
    # Sections switched off change nothing in DeepSpeed, so nothing is reported for them.
    given = {"optimizer": {"type": "OneBitAdam", "params": {"bias_correction": False}, "legacy_fusion": False},
             "gradient_clipping": 0, "fp16": {"enabled": False}, "zero_optimization": {"stage": 0},
             "prescale_gradients": False}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distcomp.optim"):
        assert not optim.from_deepspeed_config(given, make_model().parameters()).param_groups[0]["bias_correction"]
    assert not [r for r in caplog.records if r.levelno == logging.WARNING], "nothing left unapplied"


def test_deepspeed_keys_deepspeed_ignored_are_applied_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    given = {"optimizer": {"type": "OneBitAdam", "params": {"bias_correction": True, "eps_inside_sqrt": True}}}
    with caplog.at_level(logging.WARNING, logger="distcomp.optim"):
        opt = optim.from_deepspeed_config(given, make_model().parameters())
    assert opt.param_groups[0]["bias_correction"] and opt.config.eps_inside_sqrt
    warnings = [r.getMessage() for r in caplog.records]
    for key in ("bias_correction", "eps_inside_sqrt"):
        assert sum(f'"{key}": true is applied here' in w and "set it to false" in w for w in warnings) == 1


def test_deepspeed_key_given_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="key 'lr' is given twice in one object; keep one"):
        optim.from_deepspeed_config('{"optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-3, "lr": 2e-3}}}',
                                    make_model().parameters())


@pytest.mark.parametrize("params,match", [
    ({"lr": "auto"}, r"'optimizer.params.lr' is the string 'auto'.*HF Trainer"),
    ({"lr": "1e-4"}, r"'optimizer.params.lr' is the string '1e-4'; write it without quotes"),
    ({"bias_correction": "false"}, r"'optimizer.params.bias_correction' is the string 'false'"),
    ({"freeze_step": 400.7}, r"'freeze_step': must be an integer, got 400.7"),
    ({"freeze_step": True}, r"'freeze_step': must be an integer, got True"),
    ({"lr": None}, r"'lr': must be a number, got None"),
])
def test_deepspeed_values_of_the_wrong_type_name_the_key(params: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        optim.from_deepspeed_config({"optimizer": {"type": "OneBitAdam", "params": params}}, make_model().parameters())


def test_deepspeed_zero_one_and_lamb_keys() -> None:
    zo = {"type": "ZeroOneAdam", "params": {"lr": 1e-3, "var_freeze_step": 1000, "var_update_scaler": 16,
                                            "local_step_scaler": 1000, "local_step_clipper": 16}}
    lamb = {"type": "OneBitLamb", "params": {"lr": 1e-3, "freeze_step": 100, "max_coeff": 0.3, "min_coeff": 0.01,
                                             "coeff_beta": 0.9, "factor_max": 4.0, "factor_min": 0.5,
                                             "factor_threshold": 0.1}}
    assert optim.from_deepspeed_config({"optimizer": zo}, make_model().parameters()).config.local_step_scaler == 1000
    opt = optim.from_deepspeed_config({"optimizer": lamb}, make_model().parameters())
    assert opt.param_groups[0]["max_coeff"] == 0.3 and opt.config.coeff_beta == 0.9


@pytest.mark.parametrize("section,match", [
    ({"type": "OneBitAdam", "params": {"frezee_step": 1}}, "'frezee_step'.*did you mean 'freeze_step'"),
    ({"type": "OneBitAdam", "params": {"var_freeze_step": 1}}, "var_freeze_step"),
    ({"type": "OneBitAdam", "params": {"max_grad_norm": 1.0}}, "clip_grad_norm_"),
    ({"type": "Adam"}, "OneBitAdam, ZeroOneAdam, OneBitLamb"),
    ({"type": "OneBitAdam", "param": {}}, "'param'"),
])
def test_deepspeed_config_errors(section: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        optim.from_deepspeed_config({"optimizer": section}, make_model().parameters())


# -- checkpoints ----------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_state_dict_round_trip_continues_identically(algorithm: str, tmp_path) -> None:
    net = make_model()
    opt = OPTIMIZERS[algorithm](_groups(net, wd2=0.01), **OPTIONS[algorithm])
    _train(net, opt, range(9))
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    tail = _train(net, opt, range(9, 14))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    net2 = make_model()
    net2.load_state_dict(ckpt["model"])
    opt2 = OPTIMIZERS[algorithm](_groups(net2, wd2=0.01), **OPTIONS[algorithm])
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.steps == 9
    assert _train(net2, opt2, range(9, 14)) == tail
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters()))


def test_a_checkpoint_of_another_default_bucket_cap_loads_with_its_own_layout(tmp_path) -> None:
    """A run that chose no bucket_cap_mb takes the checkpoint's (a default that changed); a chosen one is kept."""
    net = make_model()
    opt = optim.OneBitAdam(net.parameters(), lr=0.01, freeze_step=2, block=32, bucket_cap_mb=0.0008)
    _train(net, opt, range(4))
    assert len(opt.bucket_layout()) > 1, "the test needs a layout that the default cap would not give"
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    tail = _train(net, opt, range(4, 7))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    net2 = make_model()
    net2.load_state_dict(ckpt["model"])
    opt2 = optim.OneBitAdam(net2.parameters(), lr=0.01, freeze_step=2, block=32)
    assert len(opt2.bucket_layout()) == 1
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.config.bucket_cap_mb == 0.0008 and opt2.bucket_layout() == opt.bucket_layout()
    assert _train(net2, opt2, range(4, 7)) == tail
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters()))
    chosen = optim.OneBitAdam(make_model().parameters(), lr=0.01, freeze_step=2, block=32, bucket_cap_mb=25)
    with pytest.raises(CheckpointError, match="bucket_cap_mb"):
        chosen.load_state_dict(ckpt["opt"])


def test_state_dict_holds_fp32_state_by_parameter() -> None:
    net = make_model(torch.float16)
    opt = optim.OneBitAdam(net.parameters(), lr=0.01, freeze_step=2)
    _train(net, opt, range(3))
    sd = opt.state_dict()
    assert set(sd["state"]) == {0, 1, 2, 3}
    for entry, p in zip(sd["state"].values(), net.parameters()):
        assert entry["exp_avg"].dtype == torch.float32 and entry["exp_avg"].shape == p.shape
    assert sd["distcomp"]["step"] == 3 and sd["distcomp"]["world_size"] == 1
    opt2 = optim.OneBitAdam(net.parameters(), lr=0.01, freeze_step=2)
    opt2.load_state_dict(copy.deepcopy(sd))
    for p in net.parameters():
        assert opt2.state[p]["exp_avg_sq"].dtype == torch.float32  # torch's own load would cast to fp16
        assert torch.equal(opt2.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])


def test_load_refuses_other_checkpoints() -> None:
    net = make_model()
    opt = optim.OneBitAdam(net.parameters(), freeze_step=5)
    with pytest.raises(CheckpointError, match="torch.optim"):
        opt.load_state_dict(torch.optim.AdamW(net.parameters()).state_dict())
    with pytest.raises(CheckpointError, match="ZeroOneAdam"):
        opt.load_state_dict(optim.ZeroOneAdam(net.parameters()).state_dict())
    with pytest.raises(CheckpointError, match="freeze_step"):
        opt.load_state_dict(optim.OneBitAdam(net.parameters(), freeze_step=6).state_dict())
    other = optim.OneBitAdam(net.parameters(), freeze_step=5).state_dict()
    other["distcomp"]["buckets"] = [{"params": [0], "server_error": None, "scalars": {}}]
    with pytest.raises(CheckpointError, match="fused buckets"):
        opt.load_state_dict(other)


def test_another_ranks_checkpoint_names_the_single_file_route() -> None:
    net = make_model()
    opt = optim.OneBitAdam(net.parameters(), lr=0.01, freeze_step=2)
    _train(net, opt, range(4))
    sd = copy.deepcopy(opt.state_dict())
    sd["distcomp"]["rank"] = 1  # as if rank 1 wrote it
    with pytest.raises(CheckpointError, match=r"written by rank 1 but this is rank 0.*reset_errors=True"):
        optim.OneBitAdam(net.parameters(), lr=0.01, freeze_step=2).load_state_dict(copy.deepcopy(sd))
    again = optim.OneBitAdam(net.parameters(), lr=0.01, freeze_step=2)
    again.load_state_dict(sd, reset_errors=True)
    assert again.steps == 4


# -- dtypes, missing gradients, misuse ---------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_half_precision_parameters_train(algorithm: str, dtype: torch.dtype) -> None:
    net = make_model(dtype)
    losses = _train(net, OPTIMIZERS[algorithm](net.parameters(), **OPTIONS[algorithm]), range(14))
    assert all(x == x for x in losses) and losses[-1] < losses[0], losses
    assert all(p.dtype == dtype for p in net.parameters())


def test_missing_gradients_count_as_zero() -> None:
    net = make_model()
    opt = optim.OneBitAdam(net.parameters(), lr=0.01, freeze_step=2)
    frozen_bias = list(net.parameters())[3]
    before = frozen_bias.detach().clone()
    for step in range(4):
        x, y = batch(0, step)
        opt.zero_grad(set_to_none=True)
        loss_of(net(x), y).backward()
        frozen_bias.grad = None
        opt.step()
    assert torch.equal(frozen_bias, before)  # zero gradient, zero momentum: the update is 0 / (0 + eps)


def test_add_param_group_after_first_step_is_refused() -> None:
    net = make_model()
    opt = optim.OneBitAdam(list(net.parameters())[:2], freeze_step=2)
    opt.add_param_group({"params": list(net.parameters())[2:]})
    _train(net, opt, range(1))
    with pytest.raises(RuntimeError, match="add_param_group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})


def test_closure_and_lr_scheduler() -> None:
    net = make_model()
    opt = optim.ZeroOneAdam(net.parameters(), lr=0.02, var_freeze_step=3, local_step_scaler=2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    x, y = batch(0, 0)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_of(net(x), y)
        loss.backward()
        return loss

    losses = []
    for _ in range(8):
        losses.append(opt.step(closure).item())
        sched.step()
    assert losses[-1] < losses[0] and opt.steps == 8
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02 / 9)


# -- DDP registration (one in-process rank) -----------------------------------------------


def test_register_checks_its_arguments(pg1: None) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    net, other = make_model(), make_model()
    ddp = DDP(net)
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        optim.register(net, optim.OneBitAdam(net.parameters()))
    with pytest.raises(TypeError, match="distcomp.optim optimizer"):
        optim.register(ddp, torch.optim.AdamW(net.parameters()))
    with pytest.raises(ValueError, match="not in the DDP model"):
        optim.register(ddp, optim.OneBitAdam(other.parameters()))
    opt = optim.OneBitAdam(net.parameters(), freeze_step=2)
    _train(net, opt, range(1))
    with pytest.raises(RuntimeError, match="before the optimizer's first step"):
        optim.register(ddp, opt)


def test_register_after_loading_a_checkpoint_continues_identically(pg1: None) -> None:
    """nanoGPT's order: build, load the optimizer state, then wrap in DDP and register."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = make_model()
    ddp = DDP(net)
    opt = optim.OneBitAdam(net.parameters(), lr=0.01, freeze_step=2, block=32)
    optim.register(ddp, opt)
    _train(ddp, opt, range(4))
    sd, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(net.state_dict())
    tail = _train(ddp, opt, range(4, 7))
    net2 = make_model()
    net2.load_state_dict(weights)
    opt2 = optim.OneBitAdam(net2.parameters(), lr=0.01, freeze_step=2, block=32)
    opt2.load_state_dict(sd)
    ddp2 = DDP(net2)
    optim.register(ddp2, opt2)
    assert _train(ddp2, opt2, range(4, 7)) == tail
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters()))


def test_on_one_rank_register_with_overlap_equals_the_step_time_path(pg1: None) -> None:
    """One rank compresses nothing in step(); the overlapped exchange must not compress either."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    losses = {}
    for overlap in (True, False):
        net = make_model()
        ddp = DDP(net)
        opt = optim.OneBitAdam(net.parameters(), lr=0.01, freeze_step=2, block=32)
        optim.register(ddp, opt, overlap=overlap)
        losses[overlap] = (_train(ddp, opt, range(7)), [p.detach().clone() for p in net.parameters()])
    assert losses[True][0] == losses[False][0]
    assert all(torch.equal(a, b) for a, b in zip(losses[True][1], losses[False][1]))


def test_a_single_file_from_another_rank_loads_when_opted_in(caplog: pytest.LogCaptureFixture) -> None:
    net = make_model()
    opt = optim.OneBitAdam(net.parameters(), lr=0.01, freeze_step=2)
    _train(net, opt, range(4))
    sd = copy.deepcopy(opt.state_dict())
    sd["distcomp"]["rank"] = 1  # the file another rank wrote
    opted = optim.OneBitAdam(net.parameters(), lr=0.01, freeze_step=2, reset_errors_from_other_ranks=True)
    by_attribute = optim.OneBitAdam(net.parameters(), lr=0.01, freeze_step=2)
    by_attribute.reset_errors_from_other_ranks = True  # how a framework that built the optimizer opts in
    for other in (opted, by_attribute):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="distcomp.optim"):
            other.load_state_dict(copy.deepcopy(sd))
            other.load_state_dict(copy.deepcopy(sd))
        warned = [r.getMessage() for r in caplog.records if "error feedback restarts" in r.getMessage()]
        assert len(warned) == 1, "one warning, however often it loads"
        assert other.steps == 4
        for p in net.parameters():
            assert torch.equal(other.state[p]["exp_avg"], opt.state[p]["exp_avg"])
    sd["distcomp"]["world_size"] = 2  # another world size is still refused: the errors' chunks differ
    with pytest.raises(CheckpointError, match="2 ranks"):
        opted.load_state_dict(sd)


def test_register_makes_the_fused_buckets_follow_ddps_unless_chosen(pg1: None) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = make_model()
    ddp = DDP(net, bucket_cap_mb=0.001)
    opt = optim.OneBitAdam(net.parameters(), freeze_step=2)
    optim.register(ddp, opt, overlap=False)
    assert opt.config.bucket_cap_mb == pytest.approx(0.001, rel=1e-3) and len(opt.bucket_layout()) > 1
    chosen = optim.OneBitAdam(net.parameters(), freeze_step=2, bucket_cap_mb=25)
    optim.register(DDP(net, bucket_cap_mb=0.001), chosen, overlap=False)
    assert chosen.config.bucket_cap_mb == 25 and len(chosen.bucket_layout()) == 1


def test_step_without_a_ddp_backward_is_an_error(pg1: None) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = make_model()
    ddp = DDP(net)
    opt = optim.OneBitAdam(net.parameters(), lr=0.01, freeze_step=2)
    optim.register(ddp, opt)
    losses = _train(ddp, opt, range(4))  # through DDP: fine, in both phases
    assert losses[-1] < losses[0] and opt.stats()["total"]["steps"] == 4
    x, y = batch(0, 9)
    loss_of(net(x), y).backward()  # the inner module: DDP's hook never runs
    with pytest.raises(RuntimeError, match="did not go through distcomp's hook"):
        opt.step()


def test_one_rank_group_equals_no_group(pg1: None) -> None:
    """With one rank nothing is compressed or sent, exactly as without torch.distributed."""
    a = make_model()
    opt = optim.OneBitLamb(a.parameters(), **OPTIONS["OneBitLamb"])
    losses = _train(a, opt, range(8))
    assert opt.world_size == 1 and opt.stats()["total"]["sent_bytes"] == 0
    dist = torch.distributed
    dist.destroy_process_group()
    b = make_model()
    assert _train(b, optim.OneBitLamb(b.parameters(), **OPTIONS["OneBitLamb"]), range(8)) == losses
