"""Plain DDP under torchrun, compressed in one line, with the single-file checkpoint most scripts write.

    torchrun --nproc-per-node 2 examples/torchrun_ddp.py --steps 20 --checkpoint ckpt.pt
    torchrun --nproc-per-node 2 examples/torchrun_ddp.py --steps 40 --resume ckpt.pt

Rank 0 writes the checkpoint; `distcomp.state_dict(ddp)` (called on every rank)
gathers every rank's compression state into it, so a resumed run continues
exactly where the saved one would have gone.
"""

from __future__ import annotations

import argparse
import hashlib
import json

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import distcomp


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch that depends only on (rank, step), so that resuming needs no sampler state."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(32, 64, generator=g)
    return x, x.sum(dim=1, keepdim=True).tanh()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--checkpoint", help="save here after --save-at steps (default: at the end)")
    parser.add_argument("--save-at", type=int)
    parser.add_argument("--resume", help="a checkpoint this script saved")
    parser.add_argument("--report", help="write the final loss and a digest of the parameters here (JSON)")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # "nccl" on GPUs, with the model on cuda:LOCAL_RANK
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 1))
    ddp = DDP(model)
    distcomp.register(ddp, "powersgd", rank=2)  # the one line
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)

    start = 0
    if args.resume:
        ckpt = torch.load(args.resume, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        distcomp.load_state_dict(ddp, ckpt["compression"])  # each rank takes its own entry
        start = ckpt["step"]

    for step in range(start, args.steps):
        x, y = batch(rank, step)
        loss = nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if args.checkpoint and step + 1 == (args.save_at or args.steps):
            ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step + 1}
            ckpt["compression"] = distcomp.state_dict(ddp)  # every rank: it gathers to rank 0
            if rank == 0:
                torch.save(ckpt, args.checkpoint)
    if args.report:
        digest = hashlib.sha256(torch.cat([p.detach().flatten() for p in model.parameters()]).numpy().tobytes())
        with open(f"{args.report}.rank{rank}", "w") as f:
            json.dump({"loss": loss.item(), "digest": digest.hexdigest()}, f)
    if rank == 0:
        print(f"step {args.steps}: loss {loss.item():.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
