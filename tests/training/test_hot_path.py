"""The training forward makes no host sync for input checks: token ids are validated where data enters."""

import sys

import lightning as L
import torch

from conftest import TINY_ARCH
from parcae.data.datamodule import TokenDataModule
from parcae.model import LoopedLM
from parcae.training import LoopedLMModule


def test_a_training_step_makes_no_item_call_in_the_forward(small_shards, monkeypatch):
    calls = {"item": 0, "forwards": 0}
    inside = {"depth": 0}
    real_item, real_forward = torch.Tensor.item, LoopedLM.forward

    def counting_item(self):
        # Our code's calls only: torch.nn.init.trunc_normal_ (the like-init noise) reads its two bounds from
        # CPU scalar tensors with .item(), which is no device sync.
        if inside["depth"] and "/parcae/" in sys._getframe(1).f_code.co_filename:
            calls["item"] += 1
        return real_item(self)

    def watched_forward(self, *args, **kwargs):
        inside["depth"] += 1
        calls["forwards"] += 1
        try:
            return real_forward(self, *args, **kwargs)
        finally:
            inside["depth"] -= 1

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    monkeypatch.setattr(LoopedLM, "forward", watched_forward)
    module = LoopedLMModule(arch=dict(TINY_ARCH), telemetry_every=1000)
    data = TokenDataModule(datasets=[str(small_shards)], seq_len=32, batch_size=4, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, data)
    assert calls["forwards"] == 3
    assert calls["item"] == 0


def test_direct_model_use_still_checks_token_ids(tiny_config):
    """Outside training (no data module to vouch for the ids) the model keeps its one-line id check."""
    import pytest

    model = LoopedLM(tiny_config(vocab_size=128, padding_multiple=1))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 200]]))
