"""PyTorch Lightning on 2 CPU processes, compressed by one callback, resumable from Lightning's checkpoints.

    python examples/lightning_ddp.py --epochs 2 --out-dir lightning_out
    python examples/lightning_ddp.py --epochs 4 --out-dir lightning_out --resume lightning_out/epoch=1.ckpt
    python examples/lightning_ddp.py --optimizer onebitadam      # 1-bit Adam from configure_optimizers

Lightning starts the second process itself (or runs under torchrun). The
callback registers on the DDP model Lightning built and keeps every rank's
compression state in Lightning's single checkpoint file.
"""

from __future__ import annotations

import argparse
import hashlib
import json

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import distcomp
from distcomp.integrations.lightning import Compression


class Regression(LightningModule):
    def __init__(self, optimizer: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 1))
        self.optimizer = optimizer

    def training_step(self, batch: list[torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "onebitadam":
            return distcomp.optim.OneBitAdam(self.parameters(), lr=1e-3, freeze_step=4)
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True).tanh()), batch_size=32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--optimizer", choices=["adamw", "onebitadam"], default="adamw")
    parser.add_argument("--out-dir", default="lightning_out")
    parser.add_argument("--resume", help="a checkpoint of an earlier run (ckpt_path=)")
    parser.add_argument("--report", help="write a digest of the final parameters here (JSON, per rank)")
    args = parser.parse_args()

    # The one line: a compressor for AdamW; with 1-bit Adam the optimizer compresses its own exchange.
    compression = Compression("powersgd", rank=2) if args.optimizer == "adamw" else Compression()
    saver = ModelCheckpoint(dirpath=args.out_dir, filename="{epoch}", save_top_k=-1)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=args.epochs,
        callbacks=[compression, saver],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Regression(args.optimizer)
    trainer.fit(model, data(), ckpt_path=args.resume)
    if args.report:
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        with open(f"{args.report}.rank{trainer.global_rank}", "w") as f:
            json.dump({"digest": hashlib.sha256(flat.numpy().tobytes()).hexdigest(), "step": trainer.global_step}, f)


if __name__ == "__main__":
    main()
