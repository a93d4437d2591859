"""Accelerate on 2 CPU processes, compressed in one line after `accelerator.prepare`.

    torchrun --nproc-per-node 2 examples/accelerate_ddp.py --steps 20
    accelerate launch --num_processes 2 examples/accelerate_ddp.py --steps 20   # on GPUs

`DistributedDataParallelKwargs(comm_hook=...)` takes only torch's built-in hooks
(anything else is ignored); distcomp registers on the model `prepare` returned.
"""

from __future__ import annotations

import argparse
import hashlib
import json

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distcomp.integrations.accelerate import register


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--report", help="write a digest of the final parameters here (JSON, per process)")
    args = parser.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64 * args.steps, 64, generator=g)
    loader = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True).tanh()), batch_size=32)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    state = register(accelerator, model, "powersgd", rank=2)  # the one line

    for step, (xb, yb) in enumerate(loader):
        loss = nn.functional.mse_loss(model(xb), yb)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        if step + 1 == args.steps:
            break
    if state is not None:
        accelerator.print(f"step {step + 1}: loss {loss.item():.4f}, sent {state.stats()['total']['ratio']:.1f}x less")
    if args.report:
        flat = torch.cat([p.detach().flatten().cpu() for p in model.parameters()])
        with open(f"{args.report}.rank{accelerator.process_index}", "w") as f:
            json.dump({"digest": hashlib.sha256(flat.numpy().tobytes()).hexdigest(), "steps": step + 1}, f)


if __name__ == "__main__":
    main()
