"""``distcomp train`` as the launcher tests run it, plus what they read back afterwards.

    python tests/launch/launch_train_probe.py OUT_DIR train CONFIG --set ...

Runs ``distcomp.cli.main`` unchanged and, around it: writes ``OUT_DIR/pid-rank<R>-try<T>.json``
(pid, launch node, rank, elastic restart) when the rank starts, so a test can
kill one node's worker; and saves the rank's final parameters to
``OUT_DIR/params-rank<R>.pt`` so a test can compare ranks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from distcomp import cli
from distcomp.train import loop


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    rank, attempt = os.environ["RANK"], os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    info = {"pid": os.getpid(), "rank": int(rank), "try": int(attempt),
            "node": os.environ.get("DISTCOMP_LAUNCH_NODE"), "host": os.environ.get("DISTCOMP_LAUNCH_HOST")}
    (out / f"pid-rank{rank}-try{attempt}.json").write_text(json.dumps(info))
    built: list[loop.Run] = []
    original = loop.build_run

    def capture(*args: object, **kwargs: object) -> loop.Run:
        run = original(*args, **kwargs)
        built.append(run)
        return run

    loop.build_run = capture
    code = cli.main(argv[1:])
    if built:
        torch.save(built[-1].model.state_dict(), out / f"params-rank{rank}.pt")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
