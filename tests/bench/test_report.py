"""What ``distcomp bench`` concludes from its figures, checked on figures made up for the purpose: the cell
plan, time-to-loss, the targets, the predictor's error and ranking, and result folders that never collide."""

from __future__ import annotations

from pathlib import Path

import pytest

from distcomp.bench import methods, report, validate
from distcomp.bench.results import free_folder, merge, plan_cells, replicas_per_job
from distcomp.bench.run import CellResult, MethodFigures


def cell(link: str | None, steps: dict[str, float], hosts: int = 2) -> CellResult:
    figures = {
        k: MethodFigures(k, step_s=v, spread=0.02, bound_s=steps.get("noop"), ddp_s=steps.get("ddp"))
        for k, v in steps.items()
    }
    probe = {"small_s": 1e-4, "large_s": 0.35, "large_bytes": 4 * 2**20}
    return CellResult(hosts, link, 60.0, probe, 10_000_000, figures)


def test_plan_records_losses_on_the_fastest_link_and_leaves_dense_methods_off_slow_ones() -> None:
    chosen = methods.select(["ddp", "noop", "powersgd", "int8"], warmup=3)
    cells = plan_cells([2, 4], ["100mbit", None, "10mbit"], chosen, loss_steps=10, dense=False)
    assert [(c.hosts, c.rate, c.loss_steps) for c in cells][:3] == [(2, "100mbit", 0), (2, None, 15), (2, "10mbit", 0)]
    slow = next(c for c in cells if c.rate == "10mbit")
    assert [m.name for m in slow.methods] == ["noop", "powersgd"]
    dense = plan_cells([2], ["10mbit"], chosen, loss_steps=10, dense=True)
    assert len(dense[0].methods) == 4


def test_a_cell_too_big_for_memory_is_split_into_jobs_that_each_carry_the_baselines() -> None:
    chosen = methods.select(None, warmup=3)  # 15 methods, and 2 FSDP ones that count half
    numel = 10_000_000
    assert replicas_per_job(4, numel, available=20e9) == 7  # 0.7 * 20 GB / 4 ranks, less 0.5 GB, at 400 MB each
    cells = plan_cells([4], [None], chosen, loss_steps=10, dense=False, numel=numel, available=20e9)
    assert [c.name for c in cells] == ["4h-unshaped", "4h-unshaped-2", "4h-unshaped-3"]
    weight = {m.name: 0.5 if m.kind == "fsdp" else 1.0 for m in chosen}  # FSDP replicas hold shards
    assert all({"ddp", "noop"} <= {m.name for m in c.methods} for c in cells)
    assert all(sum(weight[m.name] for m in c.methods) <= 7 for c in cells)
    expected = [m.name for m in chosen] + ["ddp", "noop"] * (len(cells) - 1)  # every job has the baselines
    assert sorted(m.name for c in cells for m in c.methods) == sorted(expected)
    first, second = cell(None, {"noop": 1.0, "ddp": 2.0, "sign": 1.2}), cell(None, {"noop": 1.5, "ddp": 3, "int8": 2})
    merged = merge([first, second])
    assert set(merged.methods) == {"noop", "ddp", "sign", "int8"}
    assert report.x_bound(merged.methods["int8"]) == pytest.approx(2 / 1.5)  # against its own job's bound


def test_time_to_loss_counts_the_steps_to_ddps_smoothed_loss() -> None:
    ddp = [5.0 - 0.1 * i for i in range(30)]
    curves = {"ddp": ddp, "slow": [5.0 - 0.05 * i for i in range(30)], "never": [5.0] * 30}
    reach = report.steps_to_loss(curves, 10)
    assert reach["ddp"].steps == 10
    # DDP's 5-step mean at step 10 is 4.3 (its raw loss at step 8); "slow" halves the descent per step, so its
    # raw loss is 4.3 at step 15 and its 5-step mean (two steps behind) gets there at step 17.
    assert reach["slow"].steps == 17
    assert reach["never"].steps is None
    assert reach["ddp"].target == pytest.approx(report.smoothed(ddp)[9])


def test_targets_report_met_and_not_met_with_their_figures() -> None:
    cells = [cell("100mbit", {"noop": 0.5, "ddp": 4.0, "powersgd": 0.52, "torch-powersgd": 0.6, "sign": 0.51})]
    lines = report.targets(cells, {2: {"1gbit": {"ddp": 10.0, "sign": 8.0, "int8": 9.0}}, 4: {"1gbit": {"ddp": 5.0, "sign": 6.0}}})
    text = "\n".join(lines)
    assert "PowerSGD rank 4 >= 4x faster per step than DDP: 7.69x -> met" in text
    assert "no slower than torch's powerSGD_hook: 0.87x -> met" in text
    assert "best compressor (sign) within 1.05x of the bound: 1.02x -> met" in text
    assert "2 hosts, 1gbit: time-to-loss of the recommended method (sign) below DDP's: 0.80x -> met" in text
    assert "4 hosts, 1gbit: the shortest time-to-loss is plain DDP's, so no compression is recommended" in text


def point(method: str, measured: float, predicted: float, spread: float = 0.01) -> validate.Point:
    return validate.Point(2, "100mbit", method, measured, predicted, spread)


def test_a_pair_is_misranked_only_when_the_measurement_orders_it_clearly() -> None:
    clear = [point("a", 1.0, 1.3), point("b", 1.2, 1.1)]  # measured a < b by 20%, predicted the other way
    assert [(x.method, y.method) for x, y in validate.misranked(clear)] == [("a", "b")]
    tied = [point("a", 1.0, 1.3), point("b", 1.03, 1.1)]  # 3% apart: within the tolerance
    assert validate.misranked(tied) == []
    noisy = [point("a", 1.0, 1.3, spread=0.3), point("b", 1.2, 1.1)]  # the gap is inside a's spread
    assert validate.misranked(noisy) == []


def test_summary_names_the_points_outside_the_limit() -> None:
    pts = [point("a", 1.0, 1.1), point("b", 2.0, 1.2), point("c", 1.0, 0.95)]
    lines = validate.summary(pts)
    assert lines[0].startswith("- 3 points; median |error| 10%, largest 40%; within 25%: 2 of 3")
    assert any("outside 25%: 2 hosts, 100mbit, b: -40%" in line for line in lines)


def test_a_run_never_writes_into_an_earlier_runs_folder(tmp_path: Path) -> None:
    first = free_folder(tmp_path, "2026-12-01-bench")
    first.mkdir()
    second = free_folder(tmp_path, "2026-12-01-bench")
    assert second.name == "2026-12-01-bench-2"
    second.mkdir()
    assert free_folder(tmp_path, "2026-12-01-bench").name == "2026-12-01-bench-3"
