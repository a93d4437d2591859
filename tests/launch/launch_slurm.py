"""A live two-node SLURM cluster on this machine: slurmctld and one slurmd per network namespace.

Built on :func:`launch_netns.two_hosts` (two namespaces joined by a veth pair).
Every daemon is started with ``nsenter --net=/run/netns/NAME`` (``ip netns exec``
would remount /sys, which slurmd then misreads) and ``unshare --uts --mount``, so
that on "host" NAME the host name is NAME and ``/etc/hosts`` (bind-mounted over,
privately) resolves every node name to its namespace address, as DNS would on a
cluster. The controller runs beside node 0's slurmd; so do the client commands
(``srun``, ``sbatch``, ``sinfo``, ``scontrol``), as on a login node.

No munge: ``AuthType=auth/none`` and ``CredType=cred/none`` (Debian's build ships
both plugins). No cgroups or systemd: ``ProctrackType=proctrack/linuxproc``,
``TaskPlugin=task/none``. The state folder is short (``/tmp/dcslurm-*``) because
slurmd puts Unix sockets in its spool folder and their paths must stay under 108
bytes. On every way out of :func:`slurm_cluster` each process left in the
namespaces is killed (daemons, stray job steps), the namespaces are removed, and
the state folder is deleted; what a killed run left behind is removed by the next.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from launch_netns import PREFIX, NetHost, cannot_create_reason, two_hosts

DAEMONS = ("slurmctld", "slurmd", "slurmstepd")
CLIENTS = ("srun", "sbatch", "sinfo", "scontrol")
TOOLS = ("nsenter", "unshare", "mount")
INSTALL_HINT = "apt-get install --no-install-recommends slurmctld slurmd slurm-client; .ci/run does it"
STARTUP_S = 40.0
"""How long the controller and both slurmd get to report the nodes idle."""
CTL_PORT, NODE_PORT = 6817, 6818
SLURM_CONF = """\
# A two-node cluster in network namespaces, written by tests/launch/launch_slurm.py.
ClusterName=distcomp-test
SlurmctldHost={ctl}({ctl_addr})
SlurmctldPort={ctl_port}
SlurmdPort={node_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
SelectType=select/linear
# Both slurmd see this machine's hardware: trust the node lines below instead.
SlurmdParameters=config_overrides
# A node is idle as soon as its slurmd registers.
ReturnToService=2
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/spool-%n
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd-%n.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
InactiveLimit=0
# A step's tasks that ignore SIGTERM get SIGKILL after 5 s; an ended job stays visible to scontrol for 60 s.
KillWait=5
MinJobAge=60
MessageTimeout=10
SlurmdTimeout=60
{nodes}
PartitionName=test Nodes=ALL Default=YES MaxTime=10 State=UP
"""
_NODE = "NodeName={name} NodeAddr={addr} CPUs=2 State=UNKNOWN"
_IN_HOST = 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"'


def missing_reason() -> str | None:
    """What this machine lacks for a live cluster (``None`` when it has everything)."""
    absent = [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name) is None]
    if absent:
        return f"{', '.join(absent)} not installed ({INSTALL_HINT})"
    absent = [name for name in TOOLS if shutil.which(name) is None]
    if absent:
        return f"{', '.join(absent)} not installed (Debian's util-linux and mount packages)"
    reason = cannot_create_reason()
    return None if reason is None else f"network namespaces cannot be created here: {reason}"


@dataclass(frozen=True)
class JobEnd:
    """How a batch job ended, as ``scontrol show job`` reports it."""

    job_id: str
    state: str
    """``COMPLETED``, ``FAILED``, ``TIMEOUT``, ``CANCELLED``, ..."""
    exit_code: int
    signal: int


@dataclass(frozen=True)
class SlurmCluster:
    """A running cluster: its nodes (namespaces, named as SLURM names them) and how to run clients on it."""

    hosts: tuple[NetHost, NetHost]
    state: Path
    conf: Path
    hosts_file: Path

    @property
    def node_names(self) -> list[str]:
        """The SLURM node names, node 0 first."""
        return [h.name for h in self.hosts]

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """``base`` plus what clients and jobs need to find this cluster's configuration."""
        return {**base, "SLURM_CONF": str(self.conf)}

    def on_host(self, index: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run on host ``index``: its network, its host name, its ``/etc/hosts``."""
        host = self.hosts[index]
        return ["nsenter", f"--net=/run/netns/{host.name}", "--", "unshare", "--uts", "--mount", "--",
                "sh", "-c", _IN_HOST, "sh", host.name, str(self.hosts_file), *argv]

    def client(self, argv: Sequence[str]) -> list[str]:
        """A client command (``srun``, ``sbatch``, ...) run on node 0, as on a login node."""
        return self.on_host(0, argv)

    def submit(self, argv: Sequence[str], env: dict[str, str], cwd: Path, timeout: float) -> JobEnd:
        """``sbatch ARGV``, then wait until the job ends; polled twice a second (``sbatch --wait`` looks ever more
        rarely: it returned 26 s after a 16 s job had ended)."""
        proc = subprocess.run(self.client(["sbatch", "--parsable", *argv]), capture_output=True, text=True,
                              timeout=30, env=env, cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {proc.stderr.strip()}\n{self.logs()}")
        job_id = proc.stdout.strip().split(";")[0]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            end = self._job_end(job_id, env)
            if end is not None:
                return end
            time.sleep(0.5)
        raise TimeoutError(f"SLURM job {job_id} still running after {timeout:.0f} s\n{self.logs()}")

    def _job_end(self, job_id: str, env: dict[str, str]) -> JobEnd | None:
        proc = subprocess.run(self.client(["scontrol", "--oneliner", "show", "job", job_id]), capture_output=True,
                              text=True, timeout=20, env=env)
        fields = dict(word.split("=", 1) for word in proc.stdout.split() if "=" in word)
        if fields.get("JobState", "PENDING") in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return None
        code, _, sig = fields.get("ExitCode", "-1:0").partition(":")
        return JobEnd(job_id, fields["JobState"], int(code), int(sig or 0))

    def logs(self) -> str:
        """The tail of every daemon's log (for assertion messages)."""
        parts = []
        for path in sorted(self.state.glob("*.log")):
            parts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-40:]))
        return "\n".join(parts)


def _write_config(state: Path, hosts: tuple[NetHost, NetHost]) -> SlurmCluster:
    (state / "ctld").mkdir()
    for h in hosts:
        (state / f"spool-{h.name}").mkdir()
    hosts_file = state / "hosts"
    hosts_file.write_text("127.0.0.1 localhost\n" + "".join(f"{h.addr} {h.name}\n" for h in hosts))
    nodes = "\n".join(_NODE.format(name=h.name, addr=h.addr) for h in hosts)
    conf = state / "slurm.conf"
    conf.write_text(SLURM_CONF.format(ctl=hosts[0].name, ctl_addr=hosts[0].addr, ctl_port=CTL_PORT,
                                      node_port=NODE_PORT, state=state, nodes=nodes))
    return SlurmCluster(hosts, state, conf, hosts_file)


def _start_daemons(cluster: SlurmCluster) -> list[subprocess.Popen]:
    conf = str(cluster.conf)
    argvs = [cluster.on_host(0, ["slurmctld", "-D", "-f", conf])]
    argvs += [cluster.on_host(i, ["slurmd", "-D", "-f", conf, "-N", h.name]) for i, h in enumerate(cluster.hosts)]
    return [subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=cluster.env(dict(os.environ)), start_new_session=True) for argv in argvs]


def _node_states(cluster: SlurmCluster) -> dict[str, str]:
    proc = subprocess.run(cluster.client(["sinfo", "--noheader", "--Node", "--format", "%N %t"]),
                          capture_output=True, text=True, timeout=20, env=cluster.env(dict(os.environ)))
    return dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)


def _wait_until_idle(cluster: SlurmCluster, daemons: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + STARTUP_S
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        exited = [d.args for d in daemons if d.poll() is not None]
        if exited:
            raise RuntimeError(f"a SLURM daemon exited at startup: {exited}\n{cluster.logs()}")
        states = _node_states(cluster)
        if all(states.get(name) == "idle" for name in cluster.node_names):
            return
        time.sleep(0.5)
    raise RuntimeError(f"SLURM nodes not idle within {STARTUP_S:.0f} s: {states}\n{cluster.logs()}")


def _kill_all_in(hosts: Sequence[NetHost]) -> None:
    """SIGTERM then SIGKILL every process in the namespaces: daemons and any job step they left."""
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + grace
        while True:
            pids = _pids_in(hosts)
            if not pids or time.monotonic() > deadline:
                break
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)


def _pids_in(hosts: Sequence[NetHost]) -> list[int]:
    pids = []
    for h in hosts:
        out = subprocess.run(["ip", "netns", "pids", h.name], capture_output=True, text=True, timeout=30).stdout
        pids += [int(p) for p in out.split()]
    return pids


def _remove_stale() -> None:
    """Kill what a killed run left in its namespaces (:func:`two_hosts` then removes them) and its state folder."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    names = re.findall(rf"^({PREFIX}-(\d+)-\d+)", listing, re.M)
    stale = [NetHost(name, "", "") for name, pid in names if not Path(f"/proc/{pid}").exists()]
    if stale:
        _kill_all_in(stale)
    for folder in Path(tempfile.gettempdir()).glob("dcslurm-*-*"):
        if not Path(f"/proc/{folder.name.split('-')[1]}").exists():
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Start the cluster, wait until both nodes are idle, and tear everything down on the way out."""
    _remove_stale()
    with two_hosts() as hosts:
        state = Path(tempfile.mkdtemp(prefix=f"dcslurm-{os.getpid()}-"))
        daemons: list[subprocess.Popen] = []
        try:
            cluster = _write_config(state, hosts)
            daemons = _start_daemons(cluster)
            _wait_until_idle(cluster, daemons)
            yield cluster
        finally:
            _kill_all_in(hosts)
            for d in daemons:
                if d.poll() is None:
                    d.kill()
                d.wait(10)
            shutil.rmtree(state, ignore_errors=True)
