"""A rank of the MPI launcher test: join torch.distributed from the environment, all-reduce, report.

    python tests/launch/launch_allreduce.py OUT_DIR

Each rank writes ``OUT_DIR/rank<R>.json`` with the variables it was given and
the result of all-reducing ``rank + 1`` (every rank must see ``n(n+1)/2``).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def main(out: Path) -> int:
    dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=30))
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    report = {k: os.environ.get(k) for k in KEYS}
    report["sum"] = value.item()
    report["mpi4py"] = "mpi4py.MPI" in sys.modules
    dist.barrier()
    dist.destroy_process_group()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{report['RANK']}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
