"""The Hugging Face Trainer on 2 CPU processes, compressed by one callback, resumable from its checkpoints.

    torchrun --nproc-per-node 2 examples/hf_trainer.py --steps 12 --out-dir hf_out
    torchrun --nproc-per-node 2 examples/hf_trainer.py --steps 24 --out-dir hf_out --resume
    torchrun --nproc-per-node 2 examples/hf_trainer.py --optimizer onebitadam   # 1-bit Adam as the Trainer's optimizer

The callback registers on the DDP model the Trainer builds and saves each
rank's compression state beside the Trainer's per-rank files in every
checkpoint folder, so `resume_from_checkpoint` continues exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import json

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

import distcomp
from distcomp.integrations.hf import Compression


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.mse_loss(self.net(x), labels)}


class Points(Dataset):
    def __init__(self, n: int) -> None:
        self.x = torch.randn(n, 64, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.x[i].sum(dim=0, keepdim=True).tanh()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-every", type=int, default=6)
    parser.add_argument("--out-dir", default="hf_out")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in OUT_DIR")
    parser.add_argument("--optimizer", choices=["adamw", "onebitadam"], default="adamw")
    parser.add_argument("--report", help="write a digest of the final parameters here (JSON, per process)")
    args = parser.parse_args()

    training = TrainingArguments(
        output_dir=args.out_dir,
        max_steps=args.steps,
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        save_steps=args.save_every,
        logging_steps=args.save_every,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
    )
    model = Regression()
    # The one line: a compressor for the Trainer's AdamW; with 1-bit Adam the optimizer compresses its own exchange.
    compression, optimizers = Compression("powersgd", rank=2), (None, None)
    if args.optimizer == "onebitadam":
        compression = Compression()
        optimizers = (distcomp.optim.OneBitAdam(model.parameters(), lr=1e-3, freeze_step=4), None)
    trainer = Trainer(
        model=model, args=training, train_dataset=Points(1024), callbacks=[compression], optimizers=optimizers
    )
    trainer.train(resume_from_checkpoint=args.resume or None)
    if args.report:
        flat = torch.cat([p.detach().flatten().cpu() for p in model.parameters()])
        with open(f"{args.report}.rank{training.process_index}", "w") as f:
            json.dump(
                {"digest": hashlib.sha256(flat.numpy().tobytes()).hexdigest(), "step": trainer.state.global_step}, f
            )


if __name__ == "__main__":
    main()
