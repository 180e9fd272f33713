"""Load a trained model (plain PyTorch, no Trainer) and its tokenizer from a parcae checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import yaml

from parcae.model import LoopedLM, ModelConfig


def load_checkpoint(ckpt_path: str | Path, device: str | torch.device = "cpu",
                    tokenizer: Optional[str | Path] = None) -> tuple[LoopedLM, Path]:
    """(model in eval mode, tokenizer.json path). The tokenizer comes from ``tokenizer``, or from the run's
    ``config.yaml``: its ``data.tokenizer`` (imported models) or else the first shard folder named there (every
    prepared shard folder carries a copy of its tokenizer)."""
    from .rundir import check_checkpoint

    ckpt_path = Path(ckpt_path)
    ckpt = check_checkpoint(ckpt_path)  # one-line CheckpointError for missing, truncated or foreign files
    hp = ckpt["hyper_parameters"]
    model = LoopedLM(ModelConfig(**hp["arch"]))
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    del ckpt
    if tokenizer is None:
        config = ckpt_path.resolve().parent / "config.yaml"
        if not config.is_file():
            raise FileNotFoundError(f"{ckpt_path}: no config.yaml beside it to find the tokenizer; pass --tokenizer")
        data = yaml.safe_load(config.read_text())["data"]
        if data.get("tokenizer"):  # the model's own tokenizer (imported models: <run dir>/tokenizer.json)
            tokenizer = Path(data["tokenizer"])
        else:
            datasets = data["datasets"]
            tokenizer = Path(datasets if isinstance(datasets, str) else datasets[0]) / "tokenizer.json"
        if not tokenizer.is_file():
            raise FileNotFoundError(f"tokenizer {tokenizer} (from {config}) not found; pass --tokenizer")
    from parcae.data import check_tokenizer_fits, load_tokenizer

    # every verb that scores text refuses a tokenizer whose vocabulary is not the model's (one-line DataError)
    check_tokenizer_fits(load_tokenizer(str(tokenizer)), tokenizer, model.config.vocab_size, model.config.name)
    return model, Path(tokenizer)
