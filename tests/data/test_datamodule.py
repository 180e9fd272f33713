"""TokenDataModule: (input, target) blocks, clear errors, mixture weights, exact resume, DDP disjointness."""

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import SHAKESPEARE_TOKENIZER, write_jsonl
from data_prep.shards import prepare_shards
from loader_probe import Interrupted, Probe
from parcae.data import DataError, TokenDataModule

HERE = Path(__file__).parent


def test_blocks_are_shifted_int64_pairs(small_shards):
    dm = TokenDataModule(datasets=[str(small_shards)], seq_len=16, batch_size=3, num_workers=0, shuffle=False)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (3, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert x[0, 0] == 0  # the first block starts with the first document's <|bos|>
    assert dm.vocab_size == 4096 and dm.tokenizer_path.name == "tokenizer.json"


def test_missing_and_incomplete_folders_name_the_folder_and_the_command(tmp_path, small_shards):
    for folder, match in ((tmp_path / "absent", "does not exist"), (tmp_path, "no manifest.json")):
        with pytest.raises(DataError, match=match) as info:
            TokenDataModule(datasets=[str(folder)]).setup("fit")
        assert str(folder) in str(info.value) and "python -m data_prep" in str(info.value)
        assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="weights has 2 entries for 1 datasets"):
        TokenDataModule(datasets=[str(small_shards)], weights=[1, 1])


def test_vocabulary_mismatch_names_both_sizes(small_shards):
    dm = TokenDataModule(datasets=[str(small_shards)])
    dm.check_vocabulary(4096, "parcae-debug")
    with pytest.raises(DataError, match=r"4,096-token vocabulary .* parcae-140m has vocab_size 32,768"):
        dm.check_vocabulary(32768, "parcae-140m")


def test_mixture_weights_set_the_observed_proportions(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ["alpha " * 200] * 60)
    b = write_jsonl(tmp_path / "b.jsonl", ["omega " * 200] * 60)
    for name, src in (("A", a), ("B", b)):
        prepare_shards([src], tmp_path / name, SHAKESPEARE_TOKENIZER, val_fraction=0.2, chunk_tokens=2048, quiet=True)
    alpha = set(__import__("parcae.data", fromlist=["x"]).load_tokenizer(str(SHAKESPEARE_TOKENIZER))
                .encode(" alpha alpha", add_special_tokens=False).ids)
    dm = TokenDataModule(datasets=[str(tmp_path / "A"), str(tmp_path / "B")], weights=[0.75, 0.25], seq_len=8,
                         batch_size=1, num_workers=0)
    dm.setup("fit")
    counts = {"A": 0, "B": 0}
    for i, (x, _) in enumerate(dm.train_dataloader()):
        tokens = set(x.flatten().tolist()) - {0, 1}
        counts["A" if tokens & alpha else "B"] += 1
        if i == 999:
            break
    assert abs(counts["A"] / 1000 - 0.75) < 0.05, counts


def _trainer(tmp_path, max_steps, callbacks=()):
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, callbacks=list(callbacks),
                     default_root_dir=tmp_path)


def test_resume_sees_exactly_the_batches_of_the_uninterrupted_run(tmp_path, small_shards):
    def datamodule():
        return TokenDataModule(datasets=[str(small_shards)], seq_len=15, batch_size=2, num_workers=1, shuffle=True)

    reference = Probe()
    _trainer(tmp_path / "ref", 12).fit(reference, datamodule=datamodule())
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    interrupted = Probe(stop_at=8)  # dies at step 8; the last checkpoint is from step 5
    with pytest.raises(Interrupted):
        _trainer(tmp_path / "run", 12, [ckpt]).fit(interrupted, datamodule=datamodule())
    assert [s for s, _ in interrupted.seen] == list(range(8))
    resumed = Probe()
    _trainer(tmp_path / "run", 12).fit(resumed, datamodule=datamodule(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=5.ckpt"))
    assert [s for s, _ in resumed.seen] == list(range(5, 12))
    assert resumed.seen == reference.seen[5:]
    assert interrupted.seen == reference.seen[:8]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ddp_processes_see_disjoint_data_covering_one_process(tmp_path, small_shards):
    script = HERE / "loader_probe.py"
    for devices in (1, 2):
        subprocess.run([sys.executable, str(script), "--data", str(small_shards), "--out", str(tmp_path / f"d{devices}"),
                        "--devices", str(devices)], check=True, cwd=HERE, capture_output=True, timeout=300)
    single = json.loads((tmp_path / "d1-0.json").read_text())["rows"]
    ranks = [json.loads((tmp_path / f"d2-{r}.json").read_text())["rows"] for r in range(2)]
    assert ranks[0] and ranks[1]
    assert not set(ranks[0]) & set(ranks[1])                  # disjoint
    union = set(ranks[0]) | set(ranks[1])
    assert union <= set(single)                               # nothing one process would not see
    # drop_last trims at most one batch per rank and worker to keep ranks in step
    assert len(single) - len(union) <= 2 * 2 * 1 * 31
    assert len(set(single)) == len(single)


def test_loader_workers_leave_ctrl_c_and_sigterm_to_the_main_process(small_shards):
    """A worker process runs the loader's worker_init_fn first: it ignores SIGINT and SIGTERM there, so a Ctrl-C
    sent to the whole command reaches only the main process's handler (the end-to-end check with a real
    ``parcae test`` is tests/training/test_run_integrity.py::test_ctrl_c_during_test_with_loader_workers_is_one_line)."""
    import signal

    from parcae.data.datamodule import quiet_worker

    dm = TokenDataModule(datasets=[str(small_shards)], seq_len=16, batch_size=3, num_workers=1)
    dm.setup("test")
    assert dm.test_dataloader().worker_init_fn is quiet_worker
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        quiet_worker(0)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
