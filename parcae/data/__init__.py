"""parcae.data: streaming token shards for training (LitData + Lightning).

Shards are prepared by ``data_prep`` (``python -m data_prep.shards --help``). ``TokenDataModule`` is imported
lazily so that data preparation does not pay for importing Lightning.
"""

from .shards import DataError, ShardFolder, check_vocabulary, open_shards
from .tokenizer import check_tokenizer_fits, load_tokenizer, token_byte_lengths

__all__ = ["DataError", "ShardFolder", "TokenDataModule", "check_tokenizer_fits", "check_vocabulary", "load_tokenizer", "open_shards",
           "token_byte_lengths"]


def __getattr__(name: str):
    if name == "TokenDataModule":
        from .datamodule import TokenDataModule

        return TokenDataModule
    raise AttributeError(f"module 'parcae.data' has no attribute {name!r}")
