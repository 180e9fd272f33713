"""Run directories and checkpoints, in plain PyTorch (no Lightning): the one owner of where a run keeps its files,
how a checkpoint is checked, found and loaded, and who may write (the run lock). Training, evaluation, inference,
interop and experiments all go through it.

    from parcae.runs import load_checkpoint
    model, tokenizer_path = load_checkpoint("checkpoints/debug/last.ckpt")
"""

from .checkpoint import load_checkpoint

__all__ = ["load_checkpoint"]
