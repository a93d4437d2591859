"""What 1-bit Adam should compress when parameters are sharded: each rank's momentum, or its gradient.

    python benchmarks/onebit_formulation.py                 # 4 simulated ranks, 300 steps, freeze at 60
    python benchmarks/onebit_formulation.py --ranks 2 --no-save

The design question behind ``distcomp.optim`` on FSDP. On DDP, 1-bit Adam
compresses each rank's local momentum ``m_i = beta1 m + (1 - beta1) g_i``. Under
FSDP a rank holds only its shard of ``m`` but all of its own gradient, so the
cheaper formulation compresses ``g_i`` (with its error) and runs the momentum
recurrence on the shard after the exchange. Both give the same average
without compression; they differ in what the sign code loses.

The ranks are simulated in one process (their gradients computed one after the
other on their own batches), so that only the formulation differs: the same
byte-level GPT (smaller than ``distcomp train``'s), data and learning-rate
schedule; AdamW on the exact mean as the baseline; then, after ``--freeze``
exact warm-up steps with the variance frozen, each rank's quantity is encoded
as signs with one mean-magnitude scale per 2048 values with worker error
feedback, and the decoded codes are averaged (one phase, no server error, for
both formulations alike). Reported: training loss over the last 20 steps and
held-out loss at the end.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

try:
    from benchmarks import common
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import common

from distcomp.models.gpt import GPT, GPTConfig
from distcomp.train.config import TrainConfig
from distcomp.train.data import ShardedBatches, load_corpus, val_batches
from distcomp.train.optim import lr_at

logger = logging.getLogger("distcomp.bench.onebit_formulation")
METHODS = {
    "adamw": "nothing (AdamW on the exact mean)",
    "momentum": "each rank's momentum (1-bit Adam; distcomp's FSDP route)",
    "gradient": "each rank's gradient",
}
"""The exact baseline, then what each rank compresses after the warm-up."""
BLOCK = 2048
BETAS = (0.9, 0.95)
EPS = 1e-8


def scaled_sign(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the 1-bit code decodes it: signs times the mean magnitude of each block of ``BLOCK`` values."""
    n = x.numel()
    blocks = torch.nn.functional.pad(x, (0, -n % BLOCK)).view(-1, BLOCK)
    scale = blocks.abs().mean(dim=1, keepdim=True)
    return (torch.where(blocks >= 0, 1.0, -1.0) * scale).view(-1)[:n]


class Simulation:
    """``ranks`` ranks' gradients on one model; the parameters, moments and worker errors as flat tensors."""

    def __init__(self, args: argparse.Namespace, gpt: GPTConfig, cfg: TrainConfig) -> None:
        torch.manual_seed(cfg.seed)
        self.model = GPT(gpt)
        self.params = list(self.model.parameters())
        self.flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        n, self.ranks = self.flat.numel(), args.ranks
        self.m, self.v = torch.zeros(n), torch.zeros(n)
        self.errors = [torch.zeros(n) for _ in range(self.ranks)]

    def gradients(self, batches: list[ShardedBatches], step: int) -> tuple[list[torch.Tensor], float]:
        """Each rank's flat gradient of its batch, and the mean loss."""
        grads, loss_sum = [], 0.0
        for rank_batches in batches:
            x, y = rank_batches.batch(step, torch.device("cpu"))
            self.model.zero_grad()
            _, loss = self.model(x.long(), y.long())
            loss.backward()
            loss_sum += float(loss.detach())
            grads.append(torch.cat([p.grad.reshape(-1) for p in self.params]))
        return grads, loss_sum / self.ranks

    def step(self, method: str, t: int, freeze: int, grads: list[torch.Tensor], lr: float) -> None:
        b1, b2 = BETAS
        if method == "adamw" or t < freeze:
            g = torch.stack(grads).mean(0)
            self.m.lerp_(g, 1 - b1)
            self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
            v_updates = t + 1
        else:
            v_updates = freeze
            quantity = [torch.lerp(self.m, g, 1 - b1) if method == "momentum" else g for g in grads]
            decoded = []
            for r, q in enumerate(quantity):
                corrected = q + self.errors[r]
                code = scaled_sign(corrected)
                self.errors[r] = corrected - code
                decoded.append(code)
            mean = torch.stack(decoded).mean(0)
            if method == "momentum":
                self.m = mean
            else:
                self.m.lerp_(mean, 1 - b1)
        bc1, bc2 = 1 - b1 ** (t + 1), 1 - b2**v_updates
        self.flat -= lr * (self.m / bc1) / ((self.v / bc2).sqrt() + EPS)
        offset = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(self.flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()


def run(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train with ``method``; its last-20-steps training loss, held-out loss and time."""
    cfg = TrainConfig(steps=args.steps)
    gpt = GPTConfig(vocab_size=256, context=128, d_model=args.d_model, n_layer=args.layers, n_head=4)
    corpus = load_corpus(cfg.data, gpt.context)
    sim = Simulation(args, gpt, cfg)
    size = cfg.data.batch_size
    batches = [ShardedBatches(corpus.train, gpt.context, size, r, args.ranks, cfg.seed) for r in range(args.ranks)]
    losses, start = [], time.perf_counter()
    for t in range(args.steps):
        grads, loss = sim.gradients(batches, t)
        losses.append(loss)
        sim.step(method, t, args.freeze, grads, lr_at(cfg.optimizer, t, args.steps))
    held_out = []
    with torch.no_grad():
        for r in range(args.ranks):
            for seqs in val_batches(corpus.val, gpt.context, cfg.data.batch_size, cfg.eval.batches, r, args.ranks):
                held_out.append(float(sim.model(seqs[:, :-1].long(), seqs[:, 1:].long())[1]))
    out = {"train_loss": sum(losses[-20:]) / 20, "val_loss": sum(held_out) / len(held_out)}
    out["seconds"] = time.perf_counter() - start
    logger.info("%s: train %.4f, held-out %.4f (%.0f s)", method, out["train_loss"], out["val_loss"], out["seconds"])
    return out


def report(results: dict[str, dict[str, Any]]) -> str:
    base = results["adamw"]["val_loss"]
    rows = [
        [METHODS[m], f"{r['train_loss']:.4f}", f"{r['val_loss']:.4f}", f"{r['val_loss'] - base:+.4f}"]
        for m, r in results.items()
    ]
    return common.markdown_table(["compressed after warm-up", "train loss (last 20)", "held-out", "vs AdamW"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = common.make_parser(__doc__)
    parser.add_argument("--ranks", type=int, default=4, help="simulated ranks")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--freeze", type=int, default=60, help="exact warm-up steps before the variance freezes")
    parser.add_argument("--d-model", type=int, default=128, help="width of the GPT")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    common.add_output_args(parser)
    args = common.parse_args(parser, argv)
    if not 1 <= args.freeze < args.steps:
        parser.error(f"--freeze {args.freeze}: give 1 <= freeze < steps ({args.steps})")
    common.log_to_console()
    torch.set_num_threads(1)
    results = {m: run(m, args) for m in METHODS}
    text = report(results)
    print(text)
    common.write_results(
        args,
        "onebit-formulation",
        title="1-bit Adam on sharded parameters: compress the momentum or the gradient",
        command=common.command_line("benchmarks/onebit_formulation.py", argv),
        report=text,
        figures={"args": vars(args), "results": results},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
