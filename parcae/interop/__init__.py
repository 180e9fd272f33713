"""parcae.interop: the official release layout (config.json + weights + tokenizer) <-> parcae run directories.

    parcae import SandyResearch/parcae-140m          # -> checkpoints/parcae-140m/ (last.ckpt, config.yaml, tokenizer)
    parcae export --format official checkpoints/parcae-140m out/parcae-140m

    from parcae.interop import import_release, export_official
"""

from .commands import export_official, import_release
from .release import InteropError, read_folder, unrepresentable, value_embedding_disagreement
from .runs import write_run

__all__ = ["InteropError", "export_official", "import_release", "read_folder", "unrepresentable",
           "value_embedding_disagreement", "write_run"]
