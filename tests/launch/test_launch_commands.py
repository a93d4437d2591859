"""``distcomp launch`` without starting ranks: hostfiles, selections, environment, and the exact argv of every mode."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from distcomp import cli
from distcomp.launch import mpi, runners, slurm
from distcomp.launch.cli import build_commands, slurm_node_command
from distcomp.launch.environment import job_env, read_env_file
from distcomp.launch.errors import EXIT_USAGE, LaunchConfigError, LaunchError
from distcomp.launch.hostfile import Host, parse_hostfile, select_hosts
from distcomp.launch.mpi_bootstrap import rank_env_from_variables
from distcomp.launch.spec import Job, Program

PY = "/opt/py/bin/python"
AGENT = [PY, "-m", "distcomp.launch.agent"]
WATCHDOG = [PY, "-m", "distcomp.launch.watchdog", "--grace", "30", "--"]
OUTPUT = "'TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE=[rank ${rank}] ' PYTHONUNBUFFERED=1"
HOSTS = (Host("node-a", 2, addr="10.0.0.1", ifname="eth1"), Host("node-b", 2, addr="10.0.0.2"))


def job(hosts: tuple[Host, ...] = HOSTS, **kw: object) -> Job:
    values = dict(hosts=hosts, program=Program("script", "train.py", ("--lr", "0.1")), python=PY,
                  master_addr=hosts[0].address, master_port=29400, rdzv_id="r42", cwd="/work/exp",
                  env=(("OMP_NUM_THREADS", "4"),))
    values.update(kw)
    return Job(**values)  # type: ignore[arg-type]


def rdzv(index: int, nnodes: str = "2", nproc: str = "2") -> list[str]:
    return ["--nnodes", nnodes, "--nproc-per-node", nproc, "--rdzv-backend", "c10d",
            "--rdzv-endpoint", "10.0.0.1:29400", "--rdzv-id", "r42",
            "--rdzv-conf", f"is_host={'true' if index == 0 else 'false'}"]


# -- hostfile --------------------------------------------------------------------------


def test_hostfile_reads_slots_addresses_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("# cluster\n\nnode-a slots=2 addr=10.0.0.1 ifname=eth1   # first\n  node-b slots=4 max_slots=8\n")
    assert parse_hostfile(path) == [Host("node-a", 2, "10.0.0.1", "eth1"), Host("node-b", 4)]


@pytest.mark.parametrize("text, words", [
    ("node-a slots=2\nnode-b slots=two\n", ["line 2", "slots='two'"]),
    ("node-a slots=2\nnode-b\n", ["line 2", "no slots=N"]),
    ("node-a slot=2\n", ["line 1", "unknown key 'slot'", "slots"]),
    ("node-a slots=2\nnode-a slots=1\n", ["line 2", "listed twice"]),
    ("slots=2\n", ["line 1", "host name"]),
    ("node-a slots=0\n", ["line 1", "from 1 to 4096"]),
    ("# only a comment\n", ["no hosts"]),
], ids=["bad-number", "no-slots", "unknown-key", "duplicate", "no-host", "zero", "empty"])
def test_malformed_hostfile_names_file_and_line(tmp_path: Path, text: str, words: list[str]) -> None:
    path = tmp_path / "hosts"
    path.write_text(text)
    with pytest.raises(LaunchConfigError) as err:
        parse_hostfile(path)
    assert str(path) in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_include_exclude_and_num_nodes_select_hosts_and_slots() -> None:
    hosts = [Host("a", 4), Host("b", 2), Host("c", 2)]
    assert select_hosts(hosts, include="a:0,2@c") == [Host("a", 2, devices=(0, 2)), Host("c", 2)]
    assert select_hosts(hosts, exclude="b@a:1") == [Host("a", 3, devices=(0, 2, 3)), Host("c", 2)]
    assert select_hosts(hosts, num_nodes=2) == hosts[:2]
    assert select_hosts(hosts, nproc_per_node=1)[0] == Host("a", 1, devices=(0,))
    for kwargs, words in [({"include": "a@zz"}, ["--include", "'zz'", "not in the hostfile", "a, b, c"]),
                          ({"exclude": "b:5"}, ["--exclude", "b has slots 0..1", "[5]"]),
                          ({"include": "a:x"}, ["HOST:SLOT"]),
                          ({"include": "a", "exclude": "b"}, ["together"]),
                          ({"num_nodes": 4}, ["--num-nodes 4", "3 host(s)"]),
                          ({"nproc_per_node": 3, "include": "b"}, ["b has 2 slot(s)"])]:
        with pytest.raises(LaunchConfigError) as err:
            select_hosts(hosts, **kwargs)  # type: ignore[arg-type]
        for word in words:
            assert word in str(err.value), (kwargs, str(err.value))


def test_environment_forwards_socket_variables_then_file_then_env_flags(tmp_path: Path) -> None:
    env_file = tmp_path / ".distcomp_env"
    env_file.write_text("# site settings\nexport NCCL_IB_DISABLE=1\nDATA=/shared/data\nGLOO_SOCKET_IFNAME=ib0\n")
    local = {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0", "HOME": "/root", "PYTHONPATH": "/src"}
    env = job_env(local, env_file, ["DATA=/fast/data", "SEED=3"])
    assert env == {"GLOO_SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": "eth0", "PYTHONPATH": "/src",
                   "NCCL_IB_DISABLE": "1", "DATA": "/fast/data", "SEED": "3"}
    env_file.write_text("GOOD=1\nthis is not an assignment\n")
    with pytest.raises(LaunchConfigError, match=r"line 2: 'this is not an assignment' is not KEY=VALUE"):
        read_env_file(env_file)
    with pytest.raises(LaunchConfigError, match="--env: '1X=2'"):
        job_env({}, None, ["1X=2"])


def test_program_forms() -> None:
    assert Program.from_argv(["--", "distcomp", "train", "c.yaml"]) == Program("module", "distcomp", ("train", "c.yaml"))
    assert Program.from_argv(["train.py", "--lr", "1"]).torchrun_args() == ["train.py", "--lr", "1"]
    assert Program.from_argv(["python", "-m", "pkg.main", "x"]).torchrun_args() == ["-m", "pkg.main", "x"]
    assert Program.from_argv(["pkg.main"], module=True).torchrun_args() == ["-m", "pkg.main"]
    assert Program.from_argv(["./run.sh", "a"]).torchrun_args() == ["--no-python", "./run.sh", "a"]
    with pytest.raises(LaunchConfigError, match="no program"):
        Program.from_argv(["--"])


# -- exact commands per mode ---------------------------------------------------------------


def test_local_mode_runs_torchrun_here() -> None:
    one = job((Host("localhost", 4, addr="127.0.0.1"),), master_addr="127.0.0.1")
    (command,) = build_commands(one, "local")
    assert list(command.argv) == [*WATCHDOG, *AGENT, "--nnodes", "1", "--nproc-per-node", "4",
                                  "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:29400", "--rdzv-id", "r42",
                                  "--rdzv-conf", "is_host=true", "--local-addr", "127.0.0.1", "--max-restarts", "0",
                                  "--tee", "3", "train.py", "--lr", "0.1"]
    assert command.lifeline  # the watchdog's stdin is the launcher's pipe
    assert dict(command.env) == {"OMP_NUM_THREADS": "4", "DISTCOMP_LAUNCH_NODE": "0",
                                 "DISTCOMP_LAUNCH_HOST": "localhost", "PYTHONUNBUFFERED": "1",
                                 "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "[rank ${rank}] "}
    (single,) = build_commands(job((Host("localhost", 1, addr="127.0.0.1"),), master_addr="127.0.0.1"), "local")
    assert "--tee" not in single.argv and "PYTHONUNBUFFERED" not in dict(single.env)  # one rank: nothing to tag


def test_ssh_mode_runs_one_agent_per_host_with_its_address_interface_and_role() -> None:
    a, b = build_commands(job(max_restarts=1, nnodes="1:2"), "ssh", ["-p", "2222"])
    head = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-p", "2222"]
    agent_a = " ".join([*WATCHDOG, *AGENT, *rdzv(0, "1:2"), "--local-addr", "10.0.0.1", "--max-restarts", "1",
                        "--tee", "3", "train.py", "--lr", "0.1"])
    agent_b = " ".join([*WATCHDOG, *AGENT, *rdzv(1, "1:2"), "--local-addr", "10.0.0.2", "--max-restarts", "1",
                        "--tee", "3", "train.py", "--lr", "0.1"])
    assert list(a.argv) == [*head, "node-a", "cd /work/exp && exec env OMP_NUM_THREADS=4 GLOO_SOCKET_IFNAME=eth1 "
                            "NCCL_SOCKET_IFNAME=eth1 DISTCOMP_LAUNCH_NODE=0 "
                            f"DISTCOMP_LAUNCH_HOST=node-a {OUTPUT} " + agent_a]
    assert list(b.argv) == [*head, "node-b", "cd /work/exp && exec env OMP_NUM_THREADS=4 "
                            "DISTCOMP_LAUNCH_NODE=1 DISTCOMP_LAUNCH_HOST=node-b "
                            f"{OUTPUT} " + agent_b]
    assert a.lifeline and b.lifeline


def test_pdsh_mode_runs_the_same_agent_lines_through_pdsh() -> None:
    the_job = job()
    commands = build_commands(the_job, "pdsh")
    for i, (command, host) in enumerate(zip(commands, HOSTS)):
        assert list(command.argv) == ["pdsh", "-S", "-w", host.name,
                                      runners.remote_shell(the_job, i, watch_stdin=False)]
        assert "distcomp.launch.watchdog --grace 30 --ignore-stdin --" in command.argv[-1]  # pdsh forwards no stdin
        assert dict(command.env) == {"PDSH_RCMD_TYPE": "ssh"} and not command.lifeline


def test_selected_slots_become_cuda_visible_devices_and_paths_are_quoted() -> None:
    hosts = (Host("a", 2, devices=(0, 2)),)
    line = runners.remote_shell(job(hosts, cwd="/my exp", master_addr="a"), 0)
    assert line.startswith("cd '/my exp' && exec env OMP_NUM_THREADS=4 CUDA_VISIBLE_DEVICES=0,2 ")


def test_mpich_command() -> None:
    command = mpi.mpi_command(job(), "mpich", multi_host=True, as_root=True)
    assert list(command.argv) == ["mpiexec", "-n", "4", "-hosts", "node-a:2,node-b:2",
                                  "-genv", "OMP_NUM_THREADS", "4", "-genv", "MASTER_ADDR", "10.0.0.1",
                                  "-genv", "MASTER_PORT", "29400",
                                  PY, "-m", "distcomp.launch.mpi_bootstrap", "train.py", "--lr", "0.1"]
    assert command.env == ()
    local = mpi.mpi_command(job(program=Program("module", "distcomp", ("train", "c.yaml"))), "mpich",
                            multi_host=False)
    assert list(local.argv[:3]) == ["mpiexec", "-n", "4"] and "-hosts" not in local.argv
    assert list(local.argv[-5:]) == ["distcomp.launch.mpi_bootstrap", "-m", "distcomp", "train", "c.yaml"]


def test_openmpi_command_sets_the_root_variables_only_as_root() -> None:
    command = mpi.mpi_command(job(), "openmpi", multi_host=True, as_root=True)
    assert list(command.argv) == ["mpirun", "-n", "4", "--host", "node-a:2,node-b:2",
                                  "-x", "OMP_NUM_THREADS=4", "-x", "MASTER_ADDR=10.0.0.1", "-x", "MASTER_PORT=29400",
                                  PY, "-m", "distcomp.launch.mpi_bootstrap", "train.py", "--lr", "0.1"]
    assert dict(command.env) == {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    assert mpi.mpi_command(job(), "openmpi", multi_host=True, as_root=False).env == ()


# -- SLURM -----------------------------------------------------------------------------------

# The SLURM_* variables of a task in a 4-node allocation (sbatch --nodes 4 --ntasks-per-node 4), as recorded on
# a cluster and published (gist jerinphilip/212b3814264c3b8da512afc2cfda4bcb), with the step variables srun adds.
RECORDED = {
    "SLURM_NODELIST": "gnode[10,20,25,37]", "SLURM_JOB_NODELIST": "gnode[10,20,25,37]", "SLURM_JOB_ID": "200505",
    "SLURM_JOBID": "200505", "SLURMD_NODENAME": "gnode10", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "4",
    "SLURM_NTASKS": "4", "SLURM_TASKS_PER_NODE": "1(x4)", "SLURM_NODEID": "0", "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0", "SLURM_JOB_CPUS_PER_NODE": "4(x4)", "SLURM_CPUS_ON_NODE": "4", "SLURM_JOB_NUM_NODES": "4",
}
STEP = {"SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gnode[10,20,25,37]", "SLURM_STEP_NUM_NODES": "4"}


def test_slurm_hostlists_and_counts_expand() -> None:
    assert slurm.expand_nodelist("gnode[10,20,25,37]") == ["gnode10", "gnode20", "gnode25", "gnode37"]
    assert slurm.expand_nodelist("gpu[001-003,010],login1,rack[1-2]-n[1-2]") == [
        "gpu001", "gpu002", "gpu003", "gpu010", "login1", "rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]
    assert slurm.expand_counts("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(LaunchConfigError, match="cannot read range"):
        slurm.expand_nodelist("gpu[1-x]")


def test_slurm_step_maps_to_this_nodes_agent_with_node_0_as_rendezvous_host() -> None:
    env = {**RECORDED, **STEP, "SLURM_NODEID": "2", "SLURMD_NODENAME": "gnode25"}
    alloc = slurm.SlurmAllocation.from_env(env)
    assert alloc == slurm.SlurmAllocation("200505", ("gnode10", "gnode20", "gnode25", "gnode37"), 2, 4, True)
    assert alloc.default_port() == 20000 + 200505 % 20000
    the_job = job(tuple(alloc.hosts()), master_addr="gnode10", master_port=alloc.default_port(),
                  rdzv_id="slurm-200505", env=())
    argv, agent_env = slurm_node_command(the_job, alloc)
    assert argv == [*AGENT, "--nnodes", "4", "--nproc-per-node", "4", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", "gnode10:20505", "--rdzv-id", "slurm-200505", "--rdzv-conf", "is_host=false",
                    "--local-addr", "gnode25", "--max-restarts", "0", "--tee", "3", "train.py", "--lr", "0.1"]
    assert agent_env == {"DISTCOMP_LAUNCH_NODE": "2", "DISTCOMP_LAUNCH_HOST": "gnode25", "PYTHONUNBUFFERED": "1",
                         "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "[rank ${rank}] "}
    assert slurm.SlurmAllocation.from_env({**env, "SLURM_GPUS_ON_NODE": "8"}).procs_per_node == 8
    assert slurm.SlurmAllocation.from_env(env, nproc_per_node=1).procs_per_node == 1


def test_slurm_dry_run_in_a_step_and_from_the_batch_script(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    for key, value in {**RECORDED, **STEP, "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["launch", "--dry-run", "--python", PY, "train.py"]) == 0  # auto: an srun step -> slurm
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "# node 0: gnode10"
    assert "--rdzv-endpoint gnode10:20505 --rdzv-id slurm-200505 --rdzv-conf is_host=true --local-addr gnode10" in out[1]
    monkeypatch.delenv("SLURM_STEP_ID")  # the batch script itself: srun one launcher per node
    assert cli.main(["launch", "--launcher", "slurm", "--dry-run", "--max-restarts", "2", "--env", "A=1",
                     "--", "distcomp", "train", "c.yaml"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["srun", "--nodes", "4", "--ntasks", "4", "--ntasks-per-node", "1",
                              "--kill-on-bad-exit=1", sys.executable, "-m", "distcomp.launch", "--launcher", "slurm",
                              "--nproc-per-node", "4", "--master-port", "20505", "--max-restarts", "2",
                              "--env", "A=1", "--", "distcomp", "train", "c.yaml"]


def test_slurm_outside_an_allocation_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    for key in ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_STEP_ID"):
        monkeypatch.delenv(key, raising=False)
    assert cli.main(["launch", "--launcher", "slurm", "train.py"]) == EXIT_USAGE
    assert "no SLURM_JOB_ID here" in capsys.readouterr().err


# -- MPI variables -------------------------------------------------------------------------


def test_mpi_rank_variables_of_mpich_and_open_mpi() -> None:
    mpich = rank_env_from_variables({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1",
                                     "MPI_LOCALNRANKS": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "2345"})
    assert mpich.as_env() == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                              "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "2345"}
    ompi = rank_env_from_variables({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                                    "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert (ompi.rank, ompi.local_world_size, ompi.master_addr, ompi.master_port, ompi.source) == (
        1, 2, "127.0.0.1", 29500, "openmpi")
    with pytest.raises(LaunchError, match="MASTER_ADDR is not set and the job spans several hosts"):
        rank_env_from_variables({"PMI_RANK": "0", "PMI_SIZE": "4", "MPI_LOCALNRANKS": "2"})
    with pytest.raises(LaunchError, match="start this under mpiexec"):
        rank_env_from_variables({})


# -- the command line ----------------------------------------------------------------------


def test_dry_run_prints_every_hosts_command(tmp_path: Path, capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hosts").write_text("node-a slots=2 addr=10.0.0.1 ifname=eth1\nnode-b slots=2 addr=10.0.0.2\n")
    argv = ["launch", "--hostfile", "hosts", "--launcher", "ssh", "--master-port", "29400", "--rdzv-id", "r42",
            "--python", PY, "--dry-run", "train.py", "--lr", "0.1"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# node 0: node-a" and lines[2] == "# node 1: node-b"
    assert "exec env GLOO_SOCKET_IFNAME=eth1 NCCL_SOCKET_IFNAME=eth1 DISTCOMP_LAUNCH_NODE=0" in lines[1]
    assert lines[3].endswith("--rdzv-conf is_host=false --local-addr 10.0.0.2 --max-restarts 0 --tee 3 train.py "
                             "--lr 0.1'")


@pytest.mark.parametrize("argv, words", [
    (["--hostfile", "nope"], ["hostfile nope: cannot read it"]),
    (["--hostfile", "hosts", "--include", "node-c"], ["--include 'node-c'", "not in the hostfile", "node-a, node-b"]),
    (["--include", "node-a"], ["select hosts of a --hostfile"]),
    (["--hostfile", "hosts", "--nnodes", "3:4"], ["--nnodes 3:4", "2 node(s)"]),
    (["--hostfile", "hosts", "--nnodes", "2:1"], ["MIN:MAX"]),
    (["--launcher", "ssh"], ["needs a --hostfile"]),
], ids=["missing-hostfile", "unknown-host", "include-without-hostfile", "too-few-nodes", "bad-nnodes", "ssh-alone"])
def test_bad_options_are_one_line_errors_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch, argv: list[str],
                                                          words: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hosts").write_text("node-a slots=1\nnode-b slots=1\n")
    assert cli.main(["launch", *argv, "--dry-run", "train.py"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("distcomp launch: error:") and "Traceback" not in err
    for word in words:
        assert word in err


@pytest.mark.parametrize("line, words", [
    ("-V slots=1", ["line 2", "host '-V'", "starts with '-'", "option"]),
    ("-oProxyCommand=touch-x slots=1", ["line 2", "does not start with a host name"]),
    ("node_b slots=1", ["line 2", "host 'node_b'", "not a host name"]),
    ("node-b. slots=1 addr=-oProxyCommand", ["line 2", "addr='-oProxyCommand'", "starts with '-'"]),
    ("node-b slots=1 addr=10.0.0.300", ["line 2", "addr='10.0.0.300'", "IPv4/IPv6"]),
    ("node-b slots=1 ifname=-eth0", ["line 2", "ifname='-eth0'", "start with '-'"]),
    ("node-b slots=1 ifname=../eth0", ["line 2", "ifname='../eth0'", "no '/'"]),
    ("node-b slots=1 ifname=averyveryverylongname0", ["line 2", "at most 15 characters"]),
    ("node-b slots=100000", ["line 2", "slots='100000'", "from 1 to 4096", "one process each"]),
], ids=["dash-host", "dash-option-host", "underscore", "dash-addr", "bad-ip", "dash-ifname", "slash-ifname",
        "long-ifname", "absurd-slots"])
def test_hostfile_names_addresses_interfaces_and_slots_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                   line: str, words: list[str]) -> None:
    (tmp_path / "hosts").write_text(f"node-a slots=1\n{line}\n")
    assert cli.main(["launch", "--hostfile", str(tmp_path / "hosts"), "--launcher", "ssh", "--dry-run",
                     "train.py"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"distcomp launch: error: hostfile {tmp_path / 'hosts'}, line 2:") and "Traceback" not in err
    for word in words:
        assert word in err, err


def test_ipv4_ipv6_and_fqdn_hosts_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("10.0.0.1 slots=1\n::1 slots=1\nnode-7.rack2.example.org. slots=2 addr=fe80::1 ifname=eth0.100\n")
    assert [h.name for h in parse_hostfile(path)] == ["10.0.0.1", "::1", "node-7.rack2.example.org."]


@pytest.mark.parametrize("argv, words", [
    (["--hostfile", "latin1"], ["hostfile latin1, line 2", "byte 0xe9 is not UTF-8", "save the file as UTF-8"]),
    (["--env-file", "latin1"], ["environment file latin1, line 2", "byte 0xe9 is not UTF-8"]),
    (["--master-port", "0"], ["--master-port 0", "1 to 65535"]),
    (["--master-port", "70000"], ["--master-port 70000", "1 to 65535"]),
    (["--ssh-port", "-1", "--hostfile", "hosts"], ["--ssh-port -1", "1 to 65535"]),
    (["--nproc-per-node", "0"], ["--nproc-per-node 0", "1 to 4096"]),
    (["--nproc-per-node", "5000", "--hostfile", "hosts"], ["--nproc-per-node 5000", "1 to 4096"]),
    (["--stop-timeout", "-5"], ["--stop-timeout -5", "finite", ">= 0"]),
    (["--stop-timeout", "nan"], ["--stop-timeout nan", "finite"]),
    (["--stop-timeout", "inf"], ["--stop-timeout inf", "finite"]),
    (["--env", "A=x\0y"], ["--env", "NUL byte"]),
    (["--env-file", "nul"], ["environment file nul, line 1", "value of A contains a NUL byte"]),
    (["--rdzv-id", "r\0"], ["--rdzv-id", "NUL byte"]),
    (["--master-addr=-oProxyCommand=x"], ["--master-addr", "starts with '-'"]),
], ids=["hostfile-latin1", "env-file-latin1", "port-0", "port-70000", "ssh-port", "nproc-0", "nproc-5000",
        "stop-negative", "stop-nan", "stop-inf", "env-nul", "env-file-nul", "rdzv-id-nul", "master-addr-dash"])
def test_bad_values_fail_before_anything_starts_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch, argv: list[str],
                                                                 words: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hosts").write_text("node-a slots=1\n")
    (tmp_path / "latin1").write_bytes(b"# hosts\ncaf\xe9 slots=1\n")
    (tmp_path / "nul").write_bytes(b"A=x\0y\n")
    assert cli.main(["launch", *argv, "--dry-run", "train.py"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("distcomp launch: error:") and "Traceback" not in err
    for word in words:
        assert word in err, err
