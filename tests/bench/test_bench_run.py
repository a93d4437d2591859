"""``distcomp bench`` for real: hosts as network namespaces on a bridge, a job started through ``distcomp
launch``, the results folder, the refusals before anything starts, and the cleanup on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distcomp.bench import netns

pytestmark = pytest.mark.slow
REASON = netns.cannot_create_reason()
needs_netns = pytest.mark.skipif(REASON is not None, reason=f"network namespaces: {REASON}")
SEND = """
import socket, sys
if sys.argv[1] == "serve":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 5601)); s.listen(1); c, _ = s.accept(); n = 0
    while (d := c.recv(65536)): n += len(d)
    print(n)
else:
    c = socket.create_connection((sys.argv[2], 5601), timeout=10); c.sendall(b"x" * 200_000); c.close()
"""


def bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distcomp", "bench", *args], capture_output=True, text=True,
                          timeout=timeout)


@needs_netns
def test_hosts_on_a_bridge_reach_each_other_count_their_bytes_and_vanish_after_an_error(tmp_path: Path) -> None:
    script = tmp_path / "send.py"
    script.write_text(SEND)
    with pytest.raises(RuntimeError, match="on purpose"), netns.hosts_on_bridge(3, "50mbit") as net:
        assert len(netns.namespaces(os.getpid())) == 4  # three hosts and the switch
        server = subprocess.Popen(net.exec_argv(2, [sys.executable, str(script), "serve"]), stdout=subprocess.PIPE,
                                  text=True)
        time.sleep(0.5)
        before = net.tx_bytes(0)
        subprocess.run(net.exec_argv(0, [sys.executable, str(script), "send", net.hosts[2].address]), check=True,
                       timeout=30)
        assert server.communicate(timeout=30)[0].strip() == "200000"
        assert 200_000 < net.tx_bytes(0) - before < 240_000  # the payload and its TCP/IP headers
        raise RuntimeError("on purpose")
    assert netns.namespaces(os.getpid()) == []


@needs_netns
def test_namespaces_of_a_killed_run_are_removed_by_the_next() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = f"{netns.PREFIX}-{dead.pid}-0"
    subprocess.run(["ip", "netns", "add", name], check=True)
    netns.remove_stale()
    assert name not in netns.namespaces()


@needs_netns
def test_smoke_run_through_the_launcher_writes_every_table_and_plot(tmp_path: Path) -> None:
    out = bench("--smoke", "--hosts", "2", "--bandwidth", "none", "--methods", "ddp,noop,none,powersgd,fsdp-sign",
                "--steps", "2", "--loss-steps", "2", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    folder = next(tmp_path.iterdir())
    assert folder.name.endswith("-bench")
    cells = json.loads((folder / "results.json").read_text())["cells"]
    figures = cells[0]["methods"]
    assert all(not f["failure"] for f in figures.values()), {k: f["failure"] for k, f in figures.items()}
    numel = cells[0]["numel"]
    # The interface counter sees what the telemetry counts, plus TCP/IP headers.
    assert 4 * numel / 1e6 <= figures["ddp"]["tx_mb"] < 1.15 * 4 * numel / 1e6
    for name in ("powersgd", "fsdp-sign"):  # FSDP: the compressed reduce-scatter and FSDP's own all-gathers
        assert 1.0 <= figures[name]["tx_mb"] / figures[name]["stats_mb"] < 1.15, name
    assert figures["noop"]["tx_mb"] < 0.01 * figures["ddp"]["tx_mb"]
    assert len(figures["ddp"]["losses"]) == 3 + 3  # warm-up, then 1.5 x the loss steps
    text = (folder / "README.md").read_text()
    for heading in ("## 2 hosts: median step", "## Targets", "## Time-to-loss, 2 hosts", "## Prediction against"):
        assert heading in text
    for plot in ("step_vs_bandwidth", "loss_vs_time", "bytes_per_step", "predicted_vs_measured"):
        assert (folder / f"{plot}.png").stat().st_size > 1000
    assert (folder / "cells" / "2h-unshaped" / "hosts").read_text().count("slots=1") == 2
    assert netns.namespaces() == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "ddp,noop,nonesuch"], "unknown method(s) nonesuch: choose from ddp, noop"),
        (["--methods", "powersgd,noop"], "--methods must include ddp"),
        (["--bandwidth", "fast"], "is not a tc rate like 100mbit"),
        (["predict", "--params", "1e6"], "give --compute-ms"),
        (["predict", "--model", "nowhere:Model", "--compute-ms", "5"], "cannot build it with no arguments"),
    ],
)
def test_refusals_come_before_anything_starts(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from distcomp.cli import main

    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_without_root_it_says_so_and_how_to_fix_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "need root" in str(netns.cannot_create_reason())


@needs_netns
def test_sigterm_stops_the_run_and_removes_every_namespace(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "distcomp", "bench", "--smoke", "--hosts", "2", "--bandwidth", "none", "--methods",
         "ddp,noop", "--steps", "100000", "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    progress = None
    while time.monotonic() < deadline and progress is None:
        progress = next(tmp_path.glob("*/cells/*/progress"), None)  # the ranks are stepping
        time.sleep(0.5)
    assert progress is not None, "the ranks never started"
    assert len(netns.namespaces(proc.pid)) == 3
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "stopped (stopped by SIGTERM); namespaces removed" in err
    assert netns.namespaces(proc.pid) == []
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert left == []  # no rank or launcher outlives the run
