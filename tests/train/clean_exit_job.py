"""A user's training script, as torchrun runs it: DDP, one distcomp line, a few steps, then exit.

    python -m torch.distributed.run --nproc-per-node 2 tests/train/clean_exit_job.py COMPRESSOR ENDING [--no-overlap]

``ENDING`` is how the script leaves:

* ``destroy``: ``dist.barrier()`` and ``dist.destroy_process_group()``, no ``close()``
  (what most users write);
* ``close``: ``state.close()``, then barrier and destroy;
* ``nothing``: returns without tearing anything down.

With ``--global`` the model and the hook state live to the end, as the globals
of a top-level script do; otherwise they die when ``main()`` returns.

The job is clean when every rank exits with status 0 and nothing on stderr says
"terminate called". Each rank also reports, on stderr, how many threads it still
runs once distcomp's exit handler is done (``threads at exit: N of B``, where B
is the count before distcomp was registered): distcomp's worker thread and the
gloo threads of its process group must be gone before the interpreter finalizes.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

_baseline: list[int] = []
_kept: list[object] = []


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _report_threads() -> None:
    print(f"threads at exit: {_threads()} of {_baseline[0]}", file=sys.stderr, flush=True)


# Exit handlers run last-registered first: registered before distcomp is imported,
# this one runs after distcomp's.
atexit.register(_report_threads)

import distcomp  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("compressor")
    parser.add_argument("ending", choices=("destroy", "close", "nothing"))
    parser.add_argument("--no-overlap", action="store_true")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--global", dest="keep", action="store_true",
                        help="keep the model and the hook state alive to the end, as a top-level script does")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    # A small bucket cap gives several buckets, as a real model has.
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.004)
    _baseline.append(_threads())
    state = distcomp.register(ddp, args.compressor, overlap=not args.no_overlap)
    if args.keep:
        _kept.extend((ddp, state))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for _ in range(args.steps):
        opt.zero_grad()
        ddp(torch.randn(16, 32)).square().mean().backward()
        opt.step()
    if args.ending == "close":
        state.close()
    if args.ending in ("destroy", "close"):
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
