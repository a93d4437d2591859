"""Bad input, tried as a careless user would: every case must end in one clear message, never a traceback or a hang.

    python benchmarks/bad_inputs.py                 # every case, a table, counts by outcome
    python benchmarks/bad_inputs.py --only launch   # one group: train, launch, api
    python benchmarks/bad_inputs.py --no-save       # print only (by default: benchmarks/results/<date>-bad-inputs.*)

Each case runs the real command (``python -m distcomp ...``) or a few lines of
the library API in a fresh process, under a timeout, and is classified:

* ``clear error``: exit code 2 or 3, no traceback, and the message names what
  the case expects (a key, a flag, a file);
* ``warned``: the run went on, with a warning naming the setting (cases where
  going on is right, e.g. a PowerSGD rank that compresses nothing);
* ``accepted``: exit 0 without the expected word (silently accepted);
* ``traceback``: a Python traceback reached the user;
* ``unclear``: another failure without the expected word;
* ``hang``: still running at the timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

try:
    from benchmarks import common
except ImportError:  # run as a script: the script's own folder is on sys.path
    import common

ROOT = Path(__file__).resolve().parents[1]
QUICK = [
    "--quiet",
    "--set",
    "model.d_model=32",
    "--set",
    "model.n_layer=1",
    "--set",
    "model.n_head=2",
    "--set",
    "model.context=32",
    "--set",
    "steps=2",
    "--set",
    "compare=[]",
    "--set",
    "eval.batches=1",
    "--set",
    "dist.timeout_s=30",
]


@dataclass(frozen=True)
class Case:
    """One bad input and the word its message must contain."""

    group: str
    label: str
    argv: tuple[str, ...]
    expect: str
    """A word the error (or warning) must contain, e.g. the key at fault."""
    warn: bool = False
    """True where going on with a warning is the right answer."""
    timeout: float = 90.0


def _train(
    label: str,
    sets: list[str],
    expect: str,
    warn: bool = False,
    config: str = str(ROOT / "configs" / "quickstart.yaml"),
    flags: tuple[str, ...] = (),
) -> Case:
    argv = ["train", config, *QUICK, *flags]
    for s in sets:
        argv += ["--set", s]
    return Case("train", label, tuple(argv), expect, warn)


def _launch(label: str, args: list[str], expect: str) -> Case:
    return Case("launch", label, ("launch", *args), expect, timeout=60.0)


def _api(label: str, code: str, expect: str) -> Case:
    return Case("api", label, ("-c", code), expect, timeout=60.0)


def train_cases(tmp: Path) -> list[Case]:
    """Bad values of every section of the train config, and bad files and flags."""
    keyed = [
        ("model.n_head=0", "n_head"),
        ("model.n_head=5", "n_head"),
        ("model.d_model=0", "d_model"),
        ("model.context=0", "context"),
        ("model.context=10000000", "context"),
        ("model.dropout=1.5", "dropout"),
        ("model.vocab_size=300", "vocab_size"),
        ("model.nosuch=1", "nosuch"),
        ("data.batch_size=0", "batch_size"),
        ("data.batch_size=100000", "batch_size"),
        ("data.val_fraction=0", "val_fraction"),
        ("data.val_fraction=1.5", "val_fraction"),
        ("data.path=/nonexistent/text", "data.path"),
        ("steps=0", "steps"),
        ("steps=-1", "steps"),
        ("steps=1.5", "steps"),
        ("steps=abc", "steps"),
        ("seed=abc", "seed"),
        ("optimizer.lr=.inf", "lr"),
        ("optimizer.lr=-1", "lr"),
        ("optimizer.lr=0", "lr"),
        ("optimizer.lr=.nan", "lr"),
        ("optimizer.betas=[0.9]", "betas"),
        ("optimizer.betas=[1.5,0.9]", "betas"),
        ("optimizer.eps=0", "eps"),
        ("optimizer.name=adam", "name"),
        ("optimizer.warmup_steps=-1", "warmup_steps"),
        ("optimizer.grad_clip=-1", "grad_clip"),
        ("optimizer.schedule=linear", "schedule"),
        ("optimizer.onebit_adam={freeze_step: -1}", "freeze_step"),
        ("optimizer.onebit_adam={nosuch: 1}", "nosuch"),
        ("dist.timeout_s=.inf", "timeout_s"),
        ("dist.timeout_s=0", "timeout_s"),
        ("dist.nproc=0", "nproc"),
        ("dist.nproc=1000", "nproc"),
        ("dist.device=tpu", "device"),
        ("dist.backend=mpi", "backend"),
        ("dist.backend=nccl", "nccl"),
        ("dist.threads=-1", "threads"),
        ("eval.every=-1", "every"),
        ("eval.batches=0", "batches"),
        ("log.every=0", "every"),
        ("checkpoint.every=-1", "every"),
        ("checkpoint.keep=-1", "keep"),
        ("name=a/b", "name"),
        ("name=''", "name"),
        ('name="a\\0b"', "NUL"),
        ('log.dir="r\\0s"', "NUL"),
        ("log.dir=/proc/distcomp", "log.dir"),
        (f"log.dir={tmp / 'latin1.txt'}/runs", "log.dir"),
        ("compare=[nosuch]", "compare"),
        ("compare=[none,none]", "compare"),
        ("compression.compressor=nosuch", "nosuch"),
        ("compression.rank=0", "rank"),
        ("compression.rank=-1", "rank"),
        ("compression.start_step=-1", "start_step"),
        ("nosuchkey=1", "nosuchkey"),
        ("compression=3", "compression"),
        ("optimizer=3", "optimizer"),
    ]
    cases = [_train(s, [s], word) for s, word in keyed]
    cases += [
        _train("powersgd rank above the matrix sizes", ["compression.rank=1000", "steps=4"], "rank", warn=True),
        _train(
            "top-k ratio that keeps everything",
            ["compression.compressor=topk", "compression.ratio=1.0", "steps=4"],
            "ratio",
            warn=True,
        ),
        _train("non-UTF-8 config", [], "UTF-8", config=str(tmp / "latin1.yaml")),
        _train("YAML syntax error", [], "YAML", config=str(tmp / "broken.yaml")),
        _train("config that is a list", [], "mapping", config=str(tmp / "list.yaml")),
        _train("config without version", [], "version", config=str(tmp / "noversion.yaml")),
        _train("missing config", [], "cannot read", config=str(tmp / "missing.yaml")),
        _train("non-UTF-8 data file", [f"data.path={tmp / 'latin1.txt'}"], "UTF-8"),
        _train("--set without =", ["steps"], "KEY=VALUE"),
        _train("--set into a value", ["steps.x=1"], "steps"),
        _train("--resume of a missing path", [], "resume", flags=("--resume", str(tmp / "nothing"))),
        _train("--resume of a folder without checkpoints", [], "checkpoint", flags=("--resume", str(tmp))),
    ]
    return cases


def launch_cases(tmp: Path) -> list[Case]:
    """Bad options, hostfiles and environment files of ``distcomp launch`` (all with --dry-run where it applies)."""
    prog = ["--", str(tmp / "ok.py")]
    hostfile = lambda name: ["--hostfile", str(tmp / name), "--dry-run", *prog]  # noqa: E731
    return [
        _launch("--master-port 0", ["--master-port", "0", *prog], "master-port"),
        _launch("--master-port 70000", ["--master-port", "70000", *prog], "master-port"),
        _launch("--master-port 70000 --dry-run", ["--master-port", "70000", "--dry-run", *prog], "master-port"),
        _launch("--master-port -1", ["--master-port", "-1", *prog], "master-port"),
        _launch("--nproc-per-node 0", ["--nproc-per-node", "0", *prog], "nproc-per-node"),
        _launch("--nproc-per-node -1", ["--nproc-per-node", "-1", *prog], "nproc-per-node"),
        _launch("--stop-timeout -5", ["--stop-timeout", "-5", *prog], "stop-timeout"),
        _launch("--stop-timeout nan", ["--stop-timeout", "nan", *prog], "stop-timeout"),
        _launch("--max-restarts -1", ["--max-restarts", "-1", *prog], "max-restarts"),
        _launch("--nnodes 3:1", ["--nnodes", "3:1", *prog], "nnodes"),
        _launch("--env without =", ["--env", "NOEQUALS", *prog], "--env"),
        _launch("no program", [], "program"),
        _launch("host name starting with -", hostfile("dash.hosts"), "host"),
        _launch("slots=0", hostfile("zero.hosts"), "slots"),
        _launch("slots=100000", hostfile("huge.hosts"), "slots"),
        _launch("slots=abc", hostfile("abc.hosts"), "slots"),
        _launch("unknown hostfile key", hostfile("key.hosts"), "foo"),
        _launch("addr= starting with -", hostfile("addr.hosts"), "addr"),
        _launch("ifname= with a slash", hostfile("ifname.hosts"), "ifname"),
        _launch("host listed twice", hostfile("twice.hosts"), "twice"),
        _launch("empty hostfile", hostfile("empty.hosts"), "no hosts"),
        _launch("missing hostfile", hostfile("missing.hosts"), "hostfile"),
        _launch("non-UTF-8 hostfile", hostfile("latin1.hosts"), "UTF-8"),
        _launch("unknown --include host", ["--include", "nosuch", *hostfile("good.hosts")], "nosuch"),
        _launch("--num-nodes beyond the hostfile", ["--num-nodes", "5", *hostfile("good.hosts")], "num-nodes"),
        _launch("non-UTF-8 env file", ["--env-file", str(tmp / "latin1.env"), "--dry-run", *prog], "UTF-8"),
        _launch("bad env file line", ["--env-file", str(tmp / "bad.env"), "--dry-run", *prog], "KEY=VALUE"),
    ]


def api_cases() -> list[Case]:
    """The library API without a process group or with bad arguments."""
    return [
        _api(
            "register on a plain module",
            "import torch, distcomp; distcomp.register(torch.nn.Linear(2, 2), 'sign')",
            "DistributedDataParallel",
        ),
        _api("unknown compressor", "import distcomp; distcomp.build_config('nosuch', {})", "nosuch"),
        _api("bad compressor option", "import distcomp; distcomp.build_config('powersgd', {'rank': -1})", "rank"),
        _api("unknown compressor option", "import distcomp; distcomp.build_config('topk', {'nosuch': 3})", "nosuch"),
        _api("missing preset", "import distcomp; distcomp.load_config('/nonexistent.yaml')", "nonexistent"),
        _api(
            "1-bit Adam lr < 0",
            "import torch, distcomp.optim as o; o.OneBitAdam([torch.zeros(2, requires_grad=True)], lr=-1)",
            "lr",
        ),
        _api(
            "1-bit Adam freeze_step=-1",
            "import torch, distcomp.optim as o; o.OneBitAdam([torch.zeros(2, requires_grad=True)], freeze_step=-1)",
            "freeze_step",
        ),
    ]


def write_files(tmp: Path) -> None:
    """The bad files the cases read."""
    files = {
        "latin1.yaml": "version: 1\nname: caf\u00e9\n".encode("latin-1"),
        "broken.yaml": b"version: 1\nmodel: [\n",
        "list.yaml": b"- 1\n- 2\n",
        "noversion.yaml": b"steps: 3\n",
        "latin1.txt": "caf\u00e9 ".encode("latin-1") * 1000,
        "dash.hosts": b"-V slots=1\n",
        "zero.hosts": b"a slots=0\n",
        "huge.hosts": b"a slots=100000\n",
        "abc.hosts": b"a slots=abc\n",
        "key.hosts": b"a slots=1 foo=2\n",
        "addr.hosts": b"a slots=1 addr=-oX\n",
        "ifname.hosts": b"a slots=1 ifname=../eth0\n",
        "twice.hosts": b"a slots=1\na slots=1\n",
        "empty.hosts": b"#\n",
        "latin1.hosts": "h\u00f4te slots=1\n".encode("latin-1"),
        "good.hosts": b"a slots=1\nb slots=1\n",
        "latin1.env": "X=caf\u00e9\n".encode("latin-1"),
        "bad.env": b"not an assignment\n",
        "ok.py": b"pass\n",
    }
    for name, data in files.items():
        (tmp / name).write_bytes(data)


@dataclass(frozen=True)
class Outcome:
    case: Case
    verdict: str
    code: int | None
    message: str
    seconds: float


def run_case(case: Case, cwd: Path) -> Outcome:
    """Run one case in a fresh process and classify what the user saw."""
    argv = [sys.executable, *(case.argv if case.group == "api" else ("-m", "distcomp", *case.argv))]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    own = tempfile.mkdtemp(dir=cwd)  # each case its own runs/ folder: cases run side by side
    tick = time.monotonic()
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=case.timeout, cwd=own, env=env, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return Outcome(case, "hang", None, "", time.monotonic() - tick)
    out = proc.stderr + proc.stdout
    lines = [ln for ln in out.splitlines() if ln.strip()]
    message = next(
        (ln for ln in reversed(lines) if case.expect in ln or "error" in ln.lower()), lines[-1] if lines else ""
    )
    message = message.replace(str(cwd), "<tmp>").strip()  # the report does not depend on where it ran
    return Outcome(case, classify(case, proc.returncode, out), proc.returncode, message, time.monotonic() - tick)


def classify(case: Case, code: int, out: str) -> str:
    """The verdict of one case from its exit code and output."""
    named = case.expect in out
    if case.group == "api":  # a library raises: the exception's own line is what the user reads
        last = out.strip().splitlines()[-1] if out.strip() else ""
        return (
            "clear error"
            if code == 1 and case.expect in last and "Error" in last
            else ("accepted" if code == 0 else "unclear")
        )
    if "Traceback (most recent call last)" in out:
        return "traceback"
    if code in (2, 3) and named:
        return "clear error"
    if code == 0:
        return "warned" if case.warn and named and "warn" in out.lower() else "accepted"
    return "unclear"


def report(outcomes: list[Outcome]) -> str:
    """A markdown table of every case and the counts by verdict."""
    good = {"clear error", "warned"}
    rows = []
    for o in outcomes:
        mark = "" if o.verdict in good else " **!**"
        text = o.message.replace("|", "\\|")[:160]
        rows.append([o.case.group, f"`{o.case.label}`", f"{o.verdict}{mark}", str(o.code), text])
    counts = Counter(o.verdict for o in outcomes)
    summary = ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
    table = common.markdown_table(("group", "case", "verdict", "exit", "what the user read"), rows)
    return f"{len(outcomes)} bad inputs: {summary}\n\n{table}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the cases, print the table, write the results files; exit status 1 unless every case ends well."""
    parser = common.make_parser(__doc__)
    parser.add_argument("--only", choices=("train", "launch", "api"), help="one group of cases")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once")
    common.add_output_args(parser)
    args = common.parse_args(parser, argv)
    common.log_to_console()
    with tempfile.TemporaryDirectory(prefix="distcomp-bad-inputs-") as name:
        tmp = Path(name)
        write_files(tmp)
        cases = train_cases(tmp) + launch_cases(tmp) + api_cases()
        cases = [c for c in cases if args.only in (None, c.group)]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            outcomes = list(pool.map(lambda c: run_case(c, tmp), cases))
    text = report(outcomes)
    print(text)
    common.write_results(
        args,
        "bad-inputs" if args.only is None else f"bad-inputs-{args.only}",
        title="Bad inputs",
        command=common.command_line(__file__, argv),
        report=text,
        figures={"outcomes": [asdict(o) for o in outcomes]},
    )
    return 0 if all(o.verdict in ("clear error", "warned") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
