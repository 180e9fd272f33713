"""Shared test helpers. Everything runs on CPU in fp32, offline, with tiny models (d <= 64)."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

ASSETS = Path(__file__).parent / "assets"
OFFICIAL_FIXTURES = sorted((ASSETS / "official").glob("official_*.pt"))


@pytest.fixture
def tiny_config():
    """A factory for tiny model configs: 2 layers of d=64 by default, overridable per test."""
    from parcae.model import ModelConfig

    def make(**overrides):
        base = dict(name="tiny", vocab_size=128, block_size=32, d_model=64, n_heads=4, d_ff=128,
                    n_prelude=1, n_recurrent=1, n_coda=1, mean_recurrence=4, backprop_depth=2)
        base.update(overrides)
        return ModelConfig(**base)

    return make
