"""nanoGPT's training loop with 1-bit Adam: gradient accumulation, rank 0's checkpoint, resume.

    torchrun --nproc-per-node 2 examples/nanogpt_accumulation.py --iters 30 --out-dir out
    torchrun --nproc-per-node 2 examples/nanogpt_accumulation.py --iters 60 --out-dir out --resume

The loop keeps nanoGPT's shape: gradients sync only on the last micro-step
(`require_backward_grad_sync`), rank 0 saves one `ckpt.pt`, and a resumed run
loads the optimizer state before wrapping the model in DDP. 1-bit Adam takes
that single file on every rank with `reset_errors_from_other_ranks=True`: the
moments and the step are rank 0's (identical on all ranks), and each other
rank restarts its compression errors, with one warning.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import distcomp
from distcomp.models.gpt import GPT, GPTConfig

CONFIG = GPTConfig(d_model=64, n_layer=2, n_head=4, context=64)


def get_batch(data: torch.Tensor, rank: int, it: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * it + 100 * rank + micro)
    ix = torch.randint(len(data) - CONFIG.context - 1, (8,), generator=g)
    x = torch.stack([data[i : i + CONFIG.context] for i in ix.tolist()])
    y = torch.stack([data[i + 1 : i + 1 + CONFIG.context] for i in ix.tolist()])
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--accumulation", type=int, default=4, help="micro-steps per optimizer step")
    parser.add_argument("--out-dir", default="out")
    parser.add_argument("--resume", action="store_true", help="start from OUT_DIR/ckpt.pt")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from pydoc_data.topics import topics  # a few hundred KB of English that ships with Python

    data = torch.tensor(list("".join(topics.values()).encode()[:300_000]), dtype=torch.long)
    torch.manual_seed(1337)
    model = GPT(CONFIG)
    optimizer = distcomp.optim.OneBitAdam(
        model.parameters(), lr=1e-3, freeze_step=10, reset_errors_from_other_ranks=True
    )
    iter_num = 0
    if args.resume:  # nanoGPT's order: weights and optimizer state first, DDP after
        checkpoint = torch.load(os.path.join(args.out_dir, "ckpt.pt"), weights_only=True)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        iter_num = checkpoint["iter_num"]
    model = DDP(model)
    distcomp.optim.register(model, optimizer)  # the one line: the optimizer decides what DDP sends

    while iter_num < args.iters:
        for micro in range(args.accumulation):
            model.require_backward_grad_sync = micro == args.accumulation - 1
            x, y = get_batch(data, rank, iter_num, micro)
            _, loss = model(x, y)
            (loss / args.accumulation).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        if rank == 0 and iter_num % 10 == 0:
            print(f"iter {iter_num}: loss {loss.item():.4f}")
    if rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        raw = model.module
        torch.save(
            {"model": raw.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": iter_num},
            os.path.join(args.out_dir, "ckpt.pt"),
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
