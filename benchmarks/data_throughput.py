"""Data pipeline speed: tokenization (MB/s per process), shard preparation, and loader tokens/s against what
training consumes (the loader must supply at least 10x the tokens/s of the tiny CPU training run).

    python benchmarks/data_throughput.py            # uses the embedded Shakespeare corpus, ~2 minutes on 2 cores
"""

from __future__ import annotations

import lzma
import json
import tempfile
import time
from pathlib import Path

import torch

from data_prep.shakespeare import CORPUS, TOKENIZER
from data_prep.shards import prepare_shards
from parcae.data import TokenDataModule, load_tokenizer
from parcae.model import DepthSampler, LoopedLM, preset


def tokenization_mb_per_s() -> tuple[float, int]:
    texts = [json.loads(line)["text"] for line in lzma.open(CORPUS, "rt", encoding="utf-8")]
    tok = load_tokenizer(str(TOKENIZER))
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    start = time.perf_counter()
    n = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return mb / (time.perf_counter() - start), n


def prepare_mb_per_s(workers: int) -> float:
    mb = sum(len(json.loads(line)["text"].encode()) for line in lzma.open(CORPUS, "rt", encoding="utf-8")) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        prepare_shards([CORPUS], Path(tmp) / "out", TOKENIZER, id_field="id", val_fraction=0.05,
                       chunk_tokens=1 << 15, num_workers=workers, quiet=True)
        return mb / (time.perf_counter() - start)


def loader_tokens_per_s(shards: Path, workers: int, seq_len: int, batch: int, batches: int = 300) -> float:
    dm = TokenDataModule(datasets=[str(shards)], seq_len=seq_len, batch_size=batch, num_workers=workers)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)  # worker start-up is not throughput
    start, n = time.perf_counter(), 0
    for i, (x, _) in enumerate(it):
        n += x.numel()
        if i + 1 == batches:
            break
    return n / (time.perf_counter() - start)


def training_tokens_per_s(seq_len: int, batch: int, steps: int = 6) -> float:
    torch.manual_seed(0)
    model = LoopedLM(preset("parcae-debug", block_size=seq_len))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sampler = DepthSampler.from_config(model.config)
    x = torch.randint(0, 4096, (batch, seq_len))
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        model(x, x, depths=sampler(step, batch)).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return batch * seq_len * steps / sum(times[1:])


def main() -> None:
    seq_len, batch = 256, 16
    shards = Path("data/shakespeare")
    if not (shards / "manifest.json").exists():
        raise SystemExit("run `python -m data_prep.shakespeare` first")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    mbps, ntok = tokenization_mb_per_s()
    print(f"tokenization (encode_batch, 1 process): {mbps:.1f} MB/s ({ntok:,} tokens)")
    for workers in (1, 2):
        print(f"shard preparation end to end, {workers} worker(s): {prepare_mb_per_s(workers):.2f} MB/s")
    train = training_tokens_per_s(seq_len, batch)
    print(f"training consumes (parcae-debug, {batch}x{seq_len}, fwd+bwd+AdamW): {train:,.0f} tokens/s")
    for workers in (0, 1, 2):
        tps = loader_tokens_per_s(shards, workers, seq_len, batch)
        print(f"loader, {workers} worker(s): {tps:,.0f} tokens/s = {tps / train:,.0f}x what training consumes")


if __name__ == "__main__":
    main()
