"""Checkpoints of a run, in plain PyTorch: check one before trusting it, find the one a run means, load the model
and its tokenizer, and write one that Lightning (``parcae test``, a resumed ``parcae fit``) can load.

    from parcae.runs import load_checkpoint
    run = load_checkpoint("checkpoints/debug")              # a run directory (its newest good checkpoint) or a file
    run.model, run.tokenizer, run.tokenizer_path, run.step  # the file is opened once, the tokenizer loaded once

"Which checkpoint of a run" has one answer (:func:`newest_checkpoint`): the good checkpoint with the highest step,
as the checkpoints themselves record it. ``last.ckpt`` is a pointer to the newest state, taken when no
``step=N.ckpt`` is newer; staging files of an interrupted write are never candidates; a damaged file is passed
over with a note. Resume, evaluation, export and consolidation all ask this one function.
"""

from __future__ import annotations

import dataclasses
import pickle
import zipfile
from pathlib import Path
from typing import Any, Optional

from .errors import CheckpointError
from .layout import (CONFIG_FILE, LAST_CHECKPOINT, SHARDED_METADATA, TOKENIZER_FILE, checkpoint_files, is_last_name,
                     is_sharded_checkpoint, step_of_name)
from .storage import describe_os_error

# -- checking one checkpoint ------------------------------------------------------------------------------------
def check_checkpoint(path: str | Path, allow_sharded: bool = False) -> dict:
    """Open a checkpoint lazily (memory-mapped, tensors and plain values only) and check it is a parcae Lightning
    checkpoint; return it. Every problem is a one-line :class:`CheckpointError` naming the file. Nothing is kept
    here: a command that checks and then loads passes on what this returned (:func:`open_checkpoint`), so the file
    is opened once and each caller holds its own dict.

    A sharded (FSDP) checkpoint is a folder with ``meta.pt``: a resume accepts it as it is (``allow_sharded``;
    returns ``{"sharded": True, "global_step": ...}``), every other use needs the consolidated file."""
    import torch

    path = Path(path)
    if is_sharded_checkpoint(path):
        if allow_sharded:
            return {"sharded": True, "global_step": _sharded_step(path)}
        raise CheckpointError(f"{path} is a sharded checkpoint folder: run `parcae consolidate {path.parent} "
                              f"--ckpt_name {path.name}` and pass the file it writes")
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    try:  # the one opening of a good file: the diagnosis below reads a file that fails to load
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read it ({describe_os_error(err)})") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, AttributeError) as err:
        _refuse_if_not_a_zip_archive(path)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            first = "it holds Python objects beyond tensors and plain values"
        raise CheckpointError(f"{path} cannot be loaded as a checkpoint: {first[:200]}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is a PyTorch file but not a Lightning checkpoint (no state_dict)")
    if "arch" not in (ckpt.get("hyper_parameters") or {}):
        raise CheckpointError(f"{path} is a Lightning checkpoint but not a parcae one (no hyper_parameters.arch)")
    return ckpt


def _refuse_if_not_a_zip_archive(path: Path) -> None:
    """The one line for a file that failed to load because it is no (whole) zip archive: truncated, or not a
    PyTorch file at all."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            whole = zipfile.is_zipfile(f)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read it ({describe_os_error(err)})") from None
    if whole:
        return
    size = path.stat().st_size
    if head == b"PK\x03\x04":
        raise CheckpointError(f"{path} is truncated or damaged ({size:,} bytes, the end of its zip archive is "
                              "missing); it cannot be loaded")
    raise CheckpointError(f"{path} is not a PyTorch checkpoint ({size:,} bytes that are not a zip archive)")


def _sharded_step(folder: Path) -> Optional[int]:
    """The step a sharded checkpoint's ``meta.pt`` records (None when it cannot be read as plain values)."""
    import torch

    try:
        meta = torch.load(folder / SHARDED_METADATA, map_location="cpu", weights_only=True)
        return int(meta["global_step"])
    except Exception:
        return step_of_name(folder.name)


def check_same_model(ckpt: dict, path: str | Path, arch: dict) -> None:
    """Refuse a checkpoint whose model differs from the config's, naming both (and the first differences)."""
    saved = ckpt["hyper_parameters"]["arch"]
    diffs = [k for k in sorted(set(saved) | set(arch)) if k in saved and k in arch and saved[k] != arch[k]]
    if diffs:
        shown = ", ".join(f"{k} {saved[k]!r} vs {arch[k]!r}" for k in diffs[:4])
        raise CheckpointError(f"{path} holds model {saved.get('name')!r} but the config describes "
                              f"{arch.get('name')!r} ({shown}{', ...' if len(diffs) > 4 else ''})")


# -- which checkpoint of a run ----------------------------------------------------------------------------------
_UNKNOWN_NEWEST = 1 << 62  # the step of a last.ckpt folder whose metadata cannot be read: newer than any step


@dataclasses.dataclass
class Found:
    """The checkpoint a run means: its path and step, why it is not ``last.ckpt`` (``note``), the damaged
    checkpoints newer than it (a resume keeps them aside, see :func:`parcae.runs.rundir.set_aside_unreadable`)
    and the checkpoint as :func:`check_checkpoint` opened it (memory-mapped; use it instead of opening it again)."""

    path: Path
    step: Optional[int]         # None: a sharded last.ckpt whose metadata could not be read
    note: Optional[str]
    unreadable: list[Path]
    checkpoint: dict = dataclasses.field(default_factory=dict, repr=False)


def newest_checkpoint(run_dir: str | Path, allow_sharded: bool = True, only_sharded: bool = False) -> Found:
    """The good checkpoint of ``run_dir`` with the highest step (see the module docstring); raises a one-line
    :class:`CheckpointError` when none loads. ``allow_sharded=False`` passes sharded folders over (naming them);
    ``only_sharded`` looks at sharded folders only (``parcae consolidate``)."""
    run_dir = Path(run_dir)
    files = [p for p in checkpoint_files(run_dir) if not only_sharded or is_sharded_checkpoint(p)]
    lasts = sorted((p for p in files if is_last_name(p.name)), key=lambda p: (p.name != LAST_CHECKPOINT, p.name))
    steps = sorted((p for p in files if not is_last_name(p.name)), key=lambda p: (step_of_name(p.name), p.name),
                   reverse=True)
    problems: list[str] = []
    damaged: list[tuple[Optional[int], Path]] = []  # (step its name says, path); None for last*.ckpt
    best: Optional[tuple[int, Path]] = None
    opened: dict[Path, dict] = {}  # the checkpoints this call opened (the one chosen is handed back in Found)

    def check(path: Path) -> Optional[int]:
        try:
            ckpt = opened[path] = check_checkpoint(path, allow_sharded=allow_sharded)
        except CheckpointError as err:
            problems.append(str(err).replace(str(path), path.name, 1))
            damaged.append((step_of_name(path.name), path))
            return None
        step = ckpt.get("global_step")
        if step is None:  # a sharded folder whose meta.pt is not plain values: its name says the step, and a
            step = step_of_name(path.name)  # last.ckpt folder (no step in its name) is taken as the newest
        return int(step) if step is not None else _UNKNOWN_NEWEST

    if not (run_dir / LAST_CHECKPOINT).exists() and not only_sharded:
        problems.append(f"there is no {LAST_CHECKPOINT}")
    for path in lasts:
        step = check(path)
        if step is not None and (best is None or step > best[0]):
            if best is not None:
                problems.append(f"{best[1].name} holds step {best[0]}, older than {path.name}")
            best = (step, path)
    for path in steps:
        if best is not None and step_of_name(path.name) <= best[0]:
            break  # last*.ckpt already holds this step or a newer one
        step = check(path)
        if step is not None:
            if best is not None:
                problems.append(f"{best[1].name} holds step {best[0]}, older than {path.name}")
            best = (step, path)
            break
    if best is None:
        what = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        kind = "sharded checkpoint" if only_sharded else "checkpoint"
        raise CheckpointError(f"{run_dir} has no {kind} that loads ({what or 'it holds none'})")
    step, path = best
    newer = [p for s, p in damaged if s is None or s > step]
    note = None if path.name == LAST_CHECKPOINT else f"resuming from {path}: {'; '.join(problems)}"
    return Found(path, None if step == _UNKNOWN_NEWEST else step, note, newer, opened[path])


def resume_checkpoint(run_dir: str | Path, unreadable: Optional[list[Path]] = None) -> tuple[Path, Optional[str]]:
    """What ``--ckpt_path last`` resumes: :func:`newest_checkpoint` as (path, note); the damaged checkpoints newer
    than it are appended to ``unreadable``."""
    found = newest_checkpoint(run_dir)
    if unreadable is not None:
        unreadable.extend(found.unreadable)
    return found.path, found.note


def newest_good_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """For error messages: the checkpoint a resume would use, or None."""
    try:
        return newest_checkpoint(run_dir).path
    except CheckpointError:
        return None


def find_checkpoint(run: str | Path) -> Path:
    """A checkpoint file as given, or a run directory's newest good single-file checkpoint."""
    return _resolve(run)[0]


def open_checkpoint(run: str | Path) -> tuple[Path, dict]:
    """The checkpoint ``run`` means (a file as given, or a run directory's :func:`newest_checkpoint`), checked
    and opened once: ``(path, checkpoint)``. What every verb that takes ``--ckpt_path`` calls before loading."""
    path, ckpt = _resolve(run)
    return path, ckpt if ckpt is not None else check_checkpoint(path)


def _resolve(run: str | Path) -> tuple[Path, Optional[dict]]:
    run = Path(run)
    if run.is_file() or is_sharded_checkpoint(run):
        return run, None
    if not run.is_dir():
        raise CheckpointError(f"{run}: no such run directory or checkpoint file")
    found = newest_checkpoint(run, allow_sharded=False)
    return found.path, found.checkpoint


# -- the tokenizer of a run -------------------------------------------------------------------------------------
def run_tokenizer(run_dir: str | Path) -> Path:
    """The tokenizer a run was trained with: the run's own copy (``<run>/tokenizer.json``, written by ``parcae fit``
    and ``parcae import``), else (runs written before fit kept a copy) the one its ``config.yaml`` names:
    ``data.tokenizer``, or the first shard folder's ``tokenizer.json``. A relative path there is relative to the
    folder the run was trained from: the working directory, or the folder above ``runs_dir`` when the run
    directory sits where ``config.yaml`` says. One-line :class:`CheckpointError` when none is found."""
    import yaml

    run_dir = Path(run_dir).resolve()
    own = run_dir / TOKENIZER_FILE
    if own.is_file():
        return own
    config = run_dir / CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(f"{run_dir} has no {TOKENIZER_FILE} and no {CONFIG_FILE} naming one; pass --tokenizer")
    try:
        saved = yaml.safe_load(config.read_text()) or {}
        data = saved.get("data") or {}
        named = data.get("tokenizer")
        if not named:
            datasets = data["datasets"]
            named = str(Path(datasets if isinstance(datasets, str) else datasets[0]) / TOKENIZER_FILE)
    except (yaml.YAMLError, KeyError, IndexError, TypeError, AttributeError):
        raise CheckpointError(f"{config} names no tokenizer (data.tokenizer or data.datasets); pass --tokenizer") \
            from None
    tried = run_path_candidates(run_dir, saved, named)
    found = next((p for p in tried if p.is_file()), None)
    if found is None:
        tried = ", ".join(map(str, tried))
        raise CheckpointError(f"tokenizer {named} (from {config}) not found (looked in {tried}); pass --tokenizer")
    return found


def run_path_candidates(run_dir: str | Path, saved: dict, named: str | Path) -> list[Path]:
    """Where a path written in a run's ``config.yaml`` (``saved``) may be: itself if absolute; else relative to the
    working directory, or to the folder the run was trained from (the folder above ``runs_dir`` when the run
    directory sits where ``config.yaml`` says it was written)."""
    named, run_dir = Path(named), Path(run_dir).resolve()
    if named.is_absolute():
        return [named]
    tried = [Path.cwd() / named]
    runs_dir, run_name = Path(str(saved.get("runs_dir") or "")), str(saved.get("run_name") or run_dir.name)
    if not runs_dir.is_absolute() and run_dir.name == run_name:
        levels = len(runs_dir.parts)  # <trained from>/<runs_dir>/<run_name>
        if run_dir.parent.parts[len(run_dir.parent.parts) - levels:] == runs_dir.parts or levels == 0:
            tried.append(run_dir.parents[levels] / named)
    return tried


def run_relative_path(run_dir: str | Path, saved: dict, named: str | Path) -> Optional[Path]:
    """The first of :func:`run_path_candidates` that exists (None if none does)."""
    return next((p for p in run_path_candidates(run_dir, saved, named) if p.exists()), None)


# -- loading ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoadedRun:
    """What :func:`load_checkpoint` returns: the model in eval mode and everything a verb needs beside it."""

    model: Any                  # parcae.model.LoopedLM, eval mode, on the requested device
    tokenizer: Any              # tokenizers.Tokenizer, checked to fit the model's vocabulary
    tokenizer_path: Path
    checkpoint: Path            # the file that was loaded
    step: int                   # optimizer steps the checkpoint was trained for
    hyper_parameters: dict      # LoopedLMModule's saved hyper-parameters (arch, optimizer, eval_loops, ...)
    metadata: dict              # the checkpoint's other plain entries (e.g. "imported": an imported release's record)

    @property
    def config(self):
        return self.model.config


_HEAVY_KEYS = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "hyper_parameters")


def load_checkpoint(ckpt_path: str | Path, device: Any = "cpu", tokenizer: Optional[str | Path] = None) -> LoadedRun:
    """Load a run's model (plain PyTorch, no Trainer) and its tokenizer, opening the checkpoint once.

    ``ckpt_path`` is a checkpoint file or a run directory (its :func:`newest_checkpoint`). The tokenizer is
    ``tokenizer`` when given, else :func:`run_tokenizer` of the checkpoint's folder; every verb refuses a
    tokenizer whose vocabulary is not the model's (one line)."""
    import torch

    from parcae.data import check_tokenizer_fits, load_tokenizer
    from parcae.model import LoopedLM, ModelConfig

    path, ckpt = open_checkpoint(ckpt_path)  # one-line CheckpointError: missing, truncated, sharded, foreign
    hp = dict(ckpt["hyper_parameters"])
    tok_path = Path(tokenizer) if tokenizer is not None else run_tokenizer(path.parent)
    if not tok_path.is_file():
        raise CheckpointError(f"tokenizer {tok_path} not found; pass --tokenizer with the model's tokenizer.json")
    try:
        tok = load_tokenizer(str(tok_path))
    except ValueError as err:
        raise CheckpointError(str(err).splitlines()[0]) from None
    config = ModelConfig(**hp["arch"])
    check_tokenizer_fits(tok, tok_path, config.vocab_size, config.name)  # before building a large model
    if str(device) == "meta":  # the model's shape without its weights (e.g. to check requests against it)
        with torch.device("meta"):
            model = LoopedLM(config).eval()
    else:
        state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
        model = LoopedLM.from_state_dict(config, state)  # no initialization of weights the checkpoint replaces
        model.to(device).eval()
    metadata = {k: v for k, v in ckpt.items() if k not in _HEAVY_KEYS}
    return LoadedRun(model=model, tokenizer=tok, tokenizer_path=tok_path, checkpoint=path,
                     step=int(ckpt.get("global_step") or 0), hyper_parameters=hp, metadata=metadata)


# -- writing: the one owner of the checkpoint format ------------------------------------------------------------
# Every parcae checkpoint holds Lightning's keys and parcae's own state under "parcae" (PARCAE_STATE_KEYS). Training
# writes them through Lightning plus :func:`parcae_state` (LoopedLMModule.on_save_checkpoint); a model trained
# elsewhere (``parcae import``) gets all of them from :func:`lightning_checkpoint`, which calls the same function.
LIGHTNING_KEYS = ("epoch", "global_step", "pytorch-lightning_version", "state_dict", "hyper_parameters", "loops",
                  "callbacks", "optimizer_states", "lr_schedulers")
PARCAE_KEY = "parcae"
PARCAE_STATE_KEYS = ("micro_step", "skipped_steps", "nonfinite_streak", "world_size")


def parcae_state(micro_step: int = 0, skipped_steps: int = 0, nonfinite_streak: int = 0,
                 world_size: Optional[int] = None) -> dict:
    """parcae's state in a checkpoint (``checkpoint["parcae"]``): the micro-step (it seeds the depth sampler and
    the initial-state noise, so a resumed run draws what an uninterrupted one would), the skipped steps and the
    current streak of non-finite losses, and the number of processes that trained it (a resume on another count
    is refused unless ``--inexact_data_resume``; None: not trained here, nothing to keep)."""
    return {"micro_step": int(micro_step), "skipped_steps": int(skipped_steps),
            "nonfinite_streak": int(nonfinite_streak), "world_size": None if world_size is None else int(world_size)}


def read_parcae_state(checkpoint: dict) -> dict:
    """:func:`parcae_state` of a checkpoint, with the defaults for entries older checkpoints lack."""
    return parcae_state(**{k: v for k, v in (checkpoint.get(PARCAE_KEY) or {}).items() if k in PARCAE_STATE_KEYS})


def lightning_checkpoint(model, hyper_parameters: Optional[dict] = None, extra: Optional[dict] = None) -> dict:
    """A checkpoint of ``model`` that ``LoopedLMModule`` loads (``parcae test``, ``parcae fit --ckpt_path``), at
    step 0 with no optimizer state: its weights under ``net.``, ``hyper_parameters.arch`` = the model's config
    (the module's other hyper-parameters keep their defaults unless given), :data:`LIGHTNING_KEYS` and
    :func:`parcae_state` (no training here: step 0, no world size). ``extra`` adds entries (never replaces these)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        lightning_version = version("lightning")
    except PackageNotFoundError:  # plain-PyTorch installs: Lightning only reads this key when it loads the file
        lightning_version = "2.0.0"
    payload = {
        "epoch": 0, "global_step": 0, "pytorch-lightning_version": lightning_version,
        "state_dict": {f"net.{k}": v.detach().contiguous() for k, v in model.state_dict().items()},  # no copy
        "hyper_parameters": {**(hyper_parameters or {}), "arch": dataclasses.asdict(model.config)},
        "loops": None, "callbacks": {}, "optimizer_states": [], "lr_schedulers": [],
        PARCAE_KEY: parcae_state(),
    }
    clash = sorted(set(extra or {}) & set(payload))
    if clash:
        raise ValueError(f"lightning_checkpoint: extra entries {clash} would replace the checkpoint format's own")
    payload.update(extra or {})
    return payload
