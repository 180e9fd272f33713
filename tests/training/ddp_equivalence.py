"""Train the tiny Parcae for a few steps on fixed blocks with 1 process (batch 8) or 2 DDP processes (4 each)
and write the per-step training loss (mean over all ranks) to <out>.json.

    python tests/training/ddp_equivalence.py --devices 2 --out /tmp/ddp2
"""

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent.parent))
from conftest import TINY_ARCH  # noqa: E402

from parcae.training import LoopedLMModule  # noqa: E402


class FixedBlocks(L.LightningDataModule):
    """64 fixed (input, target) blocks in order; Lightning gives each DDP rank rows rank, rank + world, ..."""

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = batch_size
        blocks = torch.randint(0, 4096, (64, 33), generator=torch.Generator().manual_seed(0))
        self.items = [(b[:-1], b[1:]) for b in blocks]

    def train_dataloader(self):
        sampler = None
        if torch.distributed.is_initialized():  # rank r gets rows r, r + world, ... of the 1-process order
            sampler = torch.utils.data.DistributedSampler(self.items, shuffle=False)
        return DataLoader(self.items, batch_size=self.batch_size, shuffle=False, sampler=sampler)


class Recorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    L.seed_everything(1234)
    module = LoopedLMModule(arch=TINY_ARCH, optimizer={"name": "muon_adamw", "lr": 0.003, "muon_lr": 0.01},
                            schedule={"name": "constant"})
    recorder = Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                        max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=1.0, callbacks=[recorder],
                        use_distributed_sampler=False)
    trainer.fit(module, datamodule=FixedBlocks(batch_size=8 // args.devices))
    if trainer.is_global_zero:
        Path(args.out + ".json").write_text(json.dumps(recorder.losses))


if __name__ == "__main__":
    main()
