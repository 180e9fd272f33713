"""LightningDataModule streaming (input, target) token blocks from prepared LitData shards.

    data = TokenDataModule(datasets=["data/shakespeare"], seq_len=256, batch_size=16)
    # in YAML:  data: {class_path: parcae.data.TokenDataModule, init_args: {datasets: [...], weights: [...]}}

Blocks of ``seq_len + 1`` consecutive tokens (documents packed back to back) become ``input = block[:-1]``,
``target = block[1:]``, both int64. Several shard folders are mixed by ``weights`` with LitData's
``CombinedStreamingDataset``. Datasets are built in ``setup()``, so every rank and worker gets its own
shard of the data. The loader position is saved in Lightning checkpoints (``StreamingDataLoader`` is
stateful) and restored on resume: keep ``batch_size``, ``num_workers`` and the number of devices fixed
across a resume. The saved position names the shard folders by path; a resume finds them by content instead
(:meth:`TokenDataModule.moved_shards`: the same ``train/index.json`` under another path is the same data), so a run
resumes wherever its data now lives. Loader workers ignore Ctrl-C and SIGTERM (:func:`quiet_worker`): the main
process ends the command with its one line and shuts them down.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import LightningDataModule

from .shards import DataError, ShardFolder, check_vocabulary, open_shards


def quiet_worker(_worker_id: int) -> None:
    """A loader worker leaves Ctrl-C and SIGTERM to the main process: it would otherwise run the handler it
    inherited (parcae.command_line.interruptible) and print a traceback of its own before the command's one line;
    the main process stops it when it shuts the loader down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def train_loader_states(checkpoint: dict) -> list[dict]:
    """The LitData states of the training datasets saved in a Lightning checkpoint, one per dataset in
    ``datasets`` order (a mixture saves ``{"0": state, "1": state, ...}``); [] when it holds no loader state."""
    loops = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    states = []
    for loader in (loops.get("state_dict") or {}).get("combined_loader") or []:
        dataset = (loader.get("dataset") or {}) if isinstance(loader, dict) else {}
        if "input_dir_path" in dataset:
            states.append(dataset)
        else:
            states += [dataset[k] for k in sorted(dataset, key=lambda k: int(k) if str(k).isdigit() else -1)
                       if isinstance(dataset[k], dict) and "input_dir_path" in dataset[k]]
    return states


def _litdata_path(split_dir: Path) -> Optional[str]:
    """The path LitData records for a local split folder (its own resolution of the name)."""
    from litdata.streaming.resolver import _resolve_dir

    return _resolve_dir(str(split_dir)).path


def _index_sha256(split_dir: Path) -> str:
    from .tokenizer import file_sha256

    return file_sha256(split_dir / "index.json")


def _same_layout(state: dict, split_dir: Path, block: int) -> bool:
    """For checkpoints that recorded no index digest: the chunks and samples per chunk the saved position counts
    (LitData's ``subsampled_files`` and ``region_of_interest``) are those of ``split_dir``'s index."""
    import json

    chunks = json.loads((split_dir / "index.json").read_text())["chunks"]
    files = state.get("subsampled_files")
    regions = state.get("region_of_interest")
    if files is None or regions is None:
        return False
    return list(files) == [c["filename"] for c in chunks] and \
        [tuple(r) for r in regions] == [(0, c["dim"] // block) for c in chunks]


def _to_input_target(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    block = block.long()
    return block[:-1], block[1:]


class TokenDataModule(LightningDataModule):
    def __init__(self, datasets: list[str] | str = "data/shakespeare", weights: Optional[list[float]] = None,
                 val_dataset: Optional[str] = None, seq_len: int = 256, batch_size: int = 16,
                 val_batch_size: Optional[int] = None, num_workers: int = 1, shuffle: bool = True,
                 seed: int = 1234, prepare_hint: Optional[str] = None, tokenizer: Optional[str] = None) -> None:
        """
        Args:
            datasets: Shard folders prepared by ``data_prep`` (each with manifest.json, train/, val/).
            weights: Mixture weights over ``datasets`` for training (normalised); ``None`` for one dataset.
            val_dataset: Folder whose val split is used for validation; default the first of ``datasets``.
            seq_len: Tokens per training sequence (blocks hold ``seq_len + 1`` tokens).
            batch_size: Sequences per micro-batch and device.
            val_batch_size: Sequences per validation batch (default ``batch_size``).
            num_workers: Loader worker processes per device.
            shuffle: Shuffle chunk order and blocks within chunks (training split only).
            seed: Shuffle / mixture seed.
            prepare_hint: How to prepare the data, shown when a folder is missing (data pieces set it).
            tokenizer: The model's own tokenizer.json (set for imported models, whose run directory holds it);
                every shard folder must then have been tokenized with exactly this file (same sha256), and
                ``datasets`` may be empty for commands that read no shards (predict).
        """
        super().__init__()
        self.save_hyperparameters()
        self.datasets = [datasets] if isinstance(datasets, str) else list(datasets)
        self.tokenizer = tokenizer
        if tokenizer is not None and not Path(tokenizer).is_file():
            raise DataError(f"TokenDataModule.tokenizer {tokenizer} does not exist")
        if not self.datasets and tokenizer is None:
            raise DataError("TokenDataModule.datasets is empty; name at least one shard folder")
        if weights is not None and len(weights) != len(self.datasets):
            raise DataError(f"TokenDataModule.weights has {len(weights)} entries for {len(self.datasets)} datasets")
        if weights is not None and (any(w < 0 for w in weights) or sum(weights) <= 0):
            raise DataError(f"TokenDataModule.weights must be non-negative with a positive sum, got {weights}")
        if seq_len < 1 or batch_size < 1 or num_workers < 0:
            raise DataError("TokenDataModule: seq_len and batch_size must be >= 1 and num_workers >= 0")
        self.weights = weights
        self._test_split: Optional[str] = None
        self.val_dataset = val_dataset or (self.datasets[0] if self.datasets else None)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.shuffle, self.seed = num_workers, shuffle, seed
        self.prepare_hint = prepare_hint
        self._folders: Optional[list[ShardFolder]] = None

    # -- metadata (cheap: reads manifests only) ---------------------------------------------------------
    @property
    def folders(self) -> list[ShardFolder]:
        if self._folders is None:
            folders = [open_shards(p, self.prepare_hint) for p in self.datasets]
            if self.tokenizer is not None:
                self._check_own_tokenizer(folders)
            if not folders:
                self._folders = folders
                return folders
            first = folders[0]
            for other in folders[1:]:
                if other.tokenizer_sha256 != first.tokenizer_sha256:
                    raise DataError(f"{other.root} and {first.root} were tokenized with different tokenizers "
                                    f"(sha256 {other.tokenizer_sha256[:12]} vs {first.tokenizer_sha256[:12]})")
            if Path(self.val_dataset) not in [f.root for f in folders]:
                val = open_shards(self.val_dataset, self.prepare_hint)
                if val.tokenizer_sha256 != first.tokenizer_sha256:
                    raise DataError(f"validation shards {val.root} use a different tokenizer than {first.root}")
                if self.tokenizer is not None:
                    self._check_own_tokenizer([val])
            self._folders = folders
        return self._folders

    def _check_own_tokenizer(self, folders: list[ShardFolder]) -> None:
        """Shards must be tokenized with the model's own tokenizer file (byte-identical), not just the same size."""
        from .tokenizer import file_sha256

        own = file_sha256(self.tokenizer)
        for folder in folders:
            if folder.tokenizer_sha256 != own:
                raise DataError(
                    f"{folder.root} was tokenized with another tokenizer (sha256 {folder.tokenizer_sha256[:12]}) "
                    f"than the model's {self.tokenizer} (sha256 {own[:12]}); prepare the shards with "
                    f"`python -m data_prep.shards --tokenizer {self.tokenizer} --input ... --output ...`")

    @property
    def vocab_size(self) -> int:
        if not self.folders:
            from .tokenizer import load_tokenizer

            return load_tokenizer(str(self.tokenizer)).get_vocab_size()
        return self.folders[0].vocab_size

    @property
    def tokenizer_path(self) -> Path:
        if self.tokenizer is not None:
            return Path(self.tokenizer)
        return self.folders[0].tokenizer_path

    @property
    def test_split(self) -> str:
        """What ``parcae test`` evaluates: the held-out ``test`` split when the folder has one, else ``val``
        (and every output of ``parcae test`` then says it is the validation split)."""
        if self._test_split is None:  # read by setup, the module and the report: open the folder once
            folder = open_shards(self.val_dataset, self.prepare_hint)
            self._test_split = "test" if folder.has_split("test") else "val"
        return self._test_split

    def check_vocabulary(self, model_vocab_size: int, model_name: str = "the model") -> None:
        """Every folder's tokenizer fits the model: the model then needs no per-batch token-id check."""
        if not self.folders:  # no shards (predict with the model's own tokenizer): the tokenizer must fit the model
            from .tokenizer import check_tokenizer_fits, load_tokenizer

            check_tokenizer_fits(load_tokenizer(str(self.tokenizer)), self.tokenizer, model_vocab_size, model_name)
            return
        for folder in self.folders:
            check_vocabulary(folder, model_vocab_size, model_name)

    # -- the data position across a resume -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Saved in every checkpoint: which training shards the loader position counts in, by content (the
        sha256 of each dataset's ``train/index.json``, which lists every chunk with its bytes and tokens)."""
        if not self.folders:
            return {}
        return {"train_index_sha256": [_index_sha256(f.split_dir("train")) for f in self.folders]}

    def load_state_dict(self, state_dict: dict) -> None:
        pass  # read by moved_shards from the checkpoint itself

    def moved_shards(self, checkpoint: dict, ckpt_path: str | Path) -> list[tuple[dict, str]]:
        """The saved training positions whose shards now live elsewhere: pairs (LitData state, the path where
        this data module finds the same shards now). Shards are the same when their ``train/index.json`` has the
        digest the checkpoint recorded (older checkpoints: the same chunks with the same samples per chunk).
        Raises a one-line :class:`DataError` naming ``--data.datasets`` when a folder holds other shards."""
        states = train_loader_states(checkpoint)
        if not states:
            return []
        folders = self.folders
        if len(states) != len(folders):
            raise DataError(f"{ckpt_path} was trained on {len(states)} dataset(s) but data.datasets names "
                            f"{len(folders)}; point --data.datasets at the run's shard folders")
        recorded = (checkpoint.get(type(self).__qualname__) or {}).get("train_index_sha256")
        moved = []
        for i, (state, folder) in enumerate(zip(states, folders)):
            split = folder.split_dir("train")
            now = _litdata_path(split)
            if state.get("input_dir_path") == now:
                continue
            same = _index_sha256(split) == recorded[i] if recorded and len(recorded) == len(folders) else \
                _same_layout(state, split, self.seq_len + 1)
            if not same:
                was = Path(str(state.get("input_dir_path") or state.get("input_dir_url"))).parent
                raise DataError(f"{ckpt_path} was trained on the shards in {was}, and {folder.root} holds other "
                                f"shards (its train/index.json differs); to resume, point --data.datasets at the "
                                f"folder that now holds the run's shards")
            moved.append((state, now))
        return moved

    def relocate(self, checkpoint: dict, ckpt_path: str | Path) -> None:
        """Point the saved loader position at where its shards live now (see :meth:`moved_shards`), in place."""
        for state, now in self.moved_shards(checkpoint, ckpt_path):
            state["input_dir_path"] = now

    # -- Lightning hooks ----------------------------------------------------------------------------------
    def _streaming(self, root: str | Path, split: str, shuffle: bool):
        from litdata import StreamingDataset, TokensLoader

        return StreamingDataset(str(Path(root) / split), item_loader=TokensLoader(block_size=self.seq_len + 1),
                                shuffle=shuffle, drop_last=True, seed=self.seed, transform=_to_input_target)

    def setup(self, stage: Optional[str] = None) -> None:
        from litdata import CombinedStreamingDataset

        folders = self.folders  # validates every folder before any worker starts
        if not folders:
            if stage == "predict":
                return
            raise DataError(f"no shard folder to read: pass --data.datasets [<folder>] prepared with this model's "
                            f"tokenizer (`python -m data_prep.shards --tokenizer {self.tokenizer} --input ... "
                            "--output <folder>`)")
        train = [self._streaming(f.root, "train", self.shuffle) for f in folders]
        if len(train) == 1:
            self.train_set = train[0]
        else:
            weights = self.weights or [f.tokens("train") for f in folders]  # default: proportional to size
            self.train_set = CombinedStreamingDataset(train, seed=self.seed, weights=weights, iterate_over_all=False)
        self.val_set = self._streaming(self.val_dataset, "val", shuffle=False)
        split = self.test_split
        self.test_set = self.val_set if split == "val" else self._streaming(self.val_dataset, split, shuffle=False)
        for name, ds in (("train", train[0]), ("val", self.val_set)):
            if len(ds) == 0:
                raise DataError(f"{self.datasets[0] if name == 'train' else self.val_dataset}: the {name} split "
                                f"holds fewer than seq_len + 1 = {self.seq_len + 1} tokens per chunk")

    def _loader(self, dataset, batch_size: int):
        from litdata import StreamingDataLoader

        return StreamingDataLoader(dataset, batch_size=batch_size, num_workers=self.num_workers,
                                   pin_memory=torch.cuda.is_available(), drop_last=True,
                                   worker_init_fn=quiet_worker if self.num_workers else None)

    def train_dataloader(self):
        return self._loader(self.train_set, self.batch_size)

    def val_dataloader(self):
        return self._loader(self.val_set, self.val_batch_size)

    def test_dataloader(self):
        return self._loader(self.test_set, self.val_batch_size)
