"""``distcomp check gpu``: its CPU plan end to end (what keeps it from rotting without a GPU), and its verdicts.

The GPU itself is not here: the end-to-end test runs the same command with
``--device cpu --quick``; the verdict tests feed the comparisons results that
must fail (a stream race, a kernel below its bandwidth target, a failing
kernel test), so a GPU run can only pass for the right reasons.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from distcomp.check import main
from distcomp.cli import main as cli_main
from distcomp.check.gpu import Case, Row, _agreement, _bench_row, _junit_rows, table, write_report
from distcomp.streams import Handoff, WorkerStreams, new_future


def check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distcomp.check", "gpu", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_cpu_plan_runs_every_section_and_writes_the_report(tmp_path: Path) -> None:
    proc = check("--device", "cpu", "--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (report,) = tmp_path.glob("*-gpu-check-cpu-quick.json")
    doc = json.loads(report.read_text())
    assert doc["passed"] and doc["device"] == "cpu"
    sections = {r["section"] for r in doc["rows"]}
    assert sections == {"kernels", "kernel-bench", "training", "step-time"}
    checks = {r["check"]: r for r in doc["rows"]}
    assert checks["none/overlap: equals DDP's exact mean"]["detail"] == "bit-identical"
    assert checks["kernel tests on cpu"]["status"] == "pass"
    assert "| training | fsdp/int8: runs on cpu | pass |" in proc.stdout


def test_a_second_report_keeps_the_first(tmp_path: Path) -> None:
    rows = [Row("training", "a", "pass")]
    first = write_report(rows, "cpu", True, tmp_path)
    second = write_report(rows + [Row("training", "b", "fail", "broken")], "cpu", True, tmp_path)
    assert first[0] != second[0] and second[0].name.endswith("-2.json")
    assert json.loads(first[0].read_text())["passed"] and not json.loads(second[0].read_text())["passed"]


def test_plan_and_refusals(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gpu", "--plan", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "powersgd/overlap" in out and "training" in out
    assert main(["gpu", "--device", "cpu", "--sections", "kernels,speed"]) == 2
    assert "unknown sections ['speed']" in capsys.readouterr().err
    assert cli_main(["check", "gpu", "--plan"]) == 0 and "fsdp/topk" in capsys.readouterr().out  # distcomp check
    if not torch.cuda.is_available():
        assert main(["gpu"]) == 2
        assert "no CUDA device here; pass --device cpu" in capsys.readouterr().err


def test_a_stream_race_or_a_cpu_mismatch_fails() -> None:
    case = Case(name="powersgd/overlap", method="powersgd")
    a = {case.name: torch.ones(100)}
    race = {case.name: torch.ones(100) + 1e-3}
    assert _agreement("race", case, a, {case.name: torch.ones(100)}, tol=1e-6).status == "pass"
    assert _agreement("race", case, a, race, tol=1e-6).status == "fail"
    assert _agreement("cpu", case, a, {case.name: "Traceback ..."}).status == "fail"
    lossy = Case(name="sign/overlap", method="sign")
    assert (
        _agreement("cpu", lossy, {lossy.name: torch.ones(100)}, {lossy.name: torch.ones(100) * 1.01}).status == "pass"
    )


def test_kernel_rows_fail_below_target_or_on_a_wrong_result() -> None:
    def result(kernel: str, numel: int, x_copy: float, failure: str = "") -> dict:
        return {
            "config": {"kernel": kernel, "numel": numel},
            "failure": failure,
            "x_copy": x_copy,
            "gbps": 100.0,
            "backend": "triton",
        }

    assert _bench_row(result("sign_encode", 16 * 2**20, 0.85), "cuda").status == "pass"
    assert _bench_row(result("sign_encode", 64 * 2**20, 0.5), "cuda").status == "fail"
    assert _bench_row(result("topk_pack", 64 * 2**20, 0.2), "cuda").status == "info"  # selects, not streams
    assert _bench_row(result("sign_encode", 2**20, 0.1), "cuda").status == "info"  # below the sizes targeted
    assert _bench_row(result("sign_encode", 16 * 2**20, 0.0, "bits differ"), "cuda").status == "fail"


def test_junit_failures_become_rows() -> None:
    xml = (
        '<testsuites><testsuite><testcase name="a"/><testcase name="b"><failure message="bits differ"/></testcase>'
        '<testcase name="c"><skipped message="no triton"/></testcase></testsuite></testsuites>'
    )
    rows = _junit_rows(ET.fromstring(xml), "cuda")
    assert rows[0].status == "fail" and rows[0].detail == "1/2 passed, 1 skipped"
    assert rows[1] == Row("kernels", "b", "fail", "bits differ")
    assert "| kernels | b | FAIL | bits differ |" in table(rows)


def test_cpu_hand_off_is_a_no_op() -> None:
    t = torch.ones(3)
    fut = new_future(t)
    fut.set_result(t)  # a future without devices: what the CPU path always had
    assert fut.value() is t
    with Handoff(t).on_worker(WorkerStreams()):
        pass
