"""Tiny parcae runs exported as Hugging Face folders, shared by the tests in tests/hf (d = 64, vocab 512)."""

from pathlib import Path

import torch

from conftest import ASSETS, perturb_weights
from parcae.cli import main
from parcae.interop import write_run
from parcae.model import LoopedLM, ModelConfig

TOKENIZER = ASSETS / "official_snapshots" / "parcae_tiny" / "tokenizer.json"  # 512 tokens, <|bos|> 0, <|eos|> 1
BASE = dict(vocab_size=512, block_size=64, d_model=64, n_heads=2, d_ff=128, n_prelude=1, n_recurrent=2, n_coda=1,
            mean_recurrence=3, backprop_depth=2)
# Every option the presets use: Parcae (value embeddings, QK-norm, prelude norm, readout, like-init, GQA), the RDM
# (concat injection, sandwich blocks, SwiGLU, no readout / prelude norm), add and exact-ZOH injections, zero init,
# and the fixed-depth GPT.
ARCHS = {
    "parcae": dict(n_kv_heads=1),
    "rdm": dict(injection="concat", block="sandwich", readout=False, prelude_norm=False, mlp="swiglu",
                qk_norm=False, value_embeddings=False, init="scaled"),
    "add-zero-init": dict(injection="add", state_init="zero", value_embeddings=False),
    "zoh": dict(injection="diagonal_zoh", n_prelude=2, n_coda=2),
    "gpt": dict(injection="none", n_prelude=2, n_recurrent=1, n_coda=1),
}


def make_run(root: Path, name: str, seed: int = 0, **arch) -> Path:
    torch.manual_seed(seed)
    model = perturb_weights(LoopedLM(ModelConfig(name=name, **{**BASE, **arch})))
    write_run(model, root / name, {"tokenizer.json": TOKENIZER})
    return root / name


def export(run: Path, out: Path, *extra: str) -> Path:
    main(["export", "--format", "hf", *extra, str(run), str(out)])
    return out
