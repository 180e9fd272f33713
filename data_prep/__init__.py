"""Data preparation: tokenizer training and LitData token shards (``python -m data_prep.<step> --help``).

    python -m data_prep.shakespeare                 # the embedded default corpus -> data/shakespeare/
    python -m data_prep.tokenizer --help            # train a byte-level BPE tokenizer (paper App. R)
    python -m data_prep.shards --help               # text / JSONL / Parquet -> LitData shards + manifest
"""
