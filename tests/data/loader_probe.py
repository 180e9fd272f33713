"""Train a one-parameter LightningModule on a TokenDataModule and record a hash of every batch it sees.

Used by tests/data/test_datamodule.py, in-process and as a 2-process DDP script (Lightning re-launches this
file for rank 1). Writes JSON {"rank": r, "batches": [[global_step, sha1], ...]} to --out-<rank>.json.

    python tests/data/loader_probe.py --data <shards> --out /tmp/probe --devices 2 --max-steps -1
"""

import argparse
import hashlib
import json

import lightning as L
import torch


def batch_hash(x: torch.Tensor) -> str:
    return hashlib.sha1(x.cpu().numpy().tobytes()).hexdigest()


def row_hashes(x: torch.Tensor) -> list[str]:
    return [batch_hash(row) for row in x]


class Interrupted(RuntimeError):
    pass


class Probe(L.LightningModule):
    """A real (tiny) training loop: one parameter, SGD, loss depending on the batch."""

    def __init__(self, stop_at: int | None = None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list = []
        self.rows: list = []
        self.stop_at = stop_at

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.stop_at is not None and self.global_step == self.stop_at:
            raise Interrupted(f"interrupted at step {self.global_step}")  # after the last checkpoint
        self.seen.append([self.global_step, batch_hash(x)])
        self.rows.extend(row_hashes(x))
        return (self.w - x.float().mean() / 1000) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main():
    from parcae.data import TokenDataModule

    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--max_epochs", type=int, default=1)
    args = p.parse_args()
    dm = TokenDataModule(datasets=[args.data], seq_len=31, batch_size=args.batch_size, num_workers=1, shuffle=False)
    model = Probe()
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                        max_epochs=args.max_epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    with open(f"{args.out}-{trainer.global_rank}.json", "w") as f:
        json.dump({"rank": trainer.global_rank, "batches": model.seen, "rows": model.rows}, f)


if __name__ == "__main__":
    main()
