"""What ``parcae fit`` does with its run directory: decide, before anything is written, whether it starts or
resumes and from which checkpoint; refuse a resume that would change what the run is; keep damaged files aside.

    from parcae.runs import rundir
    resume, notes = rundir.plan_fit(run_dir, "last", auto_resume=False)   # the newest good checkpoint by step

Only ``parcae fit`` writes into a run directory (config.yaml, hparams.yaml, tokenizer.json, checkpoints,
TensorBoard events); evaluation verbs read it. docs/training.md states the guarantees. The rules live in the
modules beside this one (layout: names; checkpoint: check, find, load; lock: one writer; storage: atomic writes);
their names are importable from here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .checkpoint import (check_checkpoint, check_same_model, find_checkpoint, newest_checkpoint,  # noqa: F401
                         newest_good_checkpoint, resume_checkpoint)
from .errors import CheckpointError, RunDirError, RunLockedError, StorageError  # noqa: F401
from .layout import LOCK_FILE, has_checkpoint
from .lock import LOCK_NAME, RunLock, release_held_locks  # noqa: F401
from .storage import (WRITE_FAULT_ERRNOS, describe_os_error, is_storage_fault, results_dir_for,  # noqa: F401
                      storage_error, writable_dir)


# -- what a fit does with its run directory -------------------------------------------------------------------
def plan_fit(run_dir: str | Path, ckpt_path: Optional[str], auto_resume: bool,
             unreadable: Optional[list[Path]] = None) -> tuple[Optional[Path], list[str]]:
    """Decide, before anything is written, which checkpoint a ``fit`` resumes from (None: a new run) and the
    notes to print. Refuses (one line) to start over a run that has checkpoints unless asked to resume.
    Unreadable checkpoints passed over are appended to ``unreadable`` (see :func:`set_aside_unreadable`)."""
    run_dir = Path(run_dir)
    if ckpt_path in (None, ""):
        if has_checkpoint(run_dir):
            if auto_resume:
                path, note = resume_checkpoint(run_dir, unreadable)
                return path, [note] if note else []
            raise RunDirError(f"{run_dir} already holds checkpoints of a run; resume it with --ckpt_path last "
                              f"(or --auto_resume true), or choose another --run_name")
        return None, []
    if ckpt_path == "last":
        if not has_checkpoint(run_dir):
            raise RunDirError(f"{run_dir} holds no checkpoint to resume (a run starts there without --ckpt_path)")
        path, note = resume_checkpoint(run_dir, unreadable)
        return path, [note] if note else []
    check_checkpoint(ckpt_path, allow_sharded=True)
    _refuse_going_back(run_dir, Path(ckpt_path))
    return Path(ckpt_path), []


def _refuse_going_back(run_dir: Path, ckpt_path: Path) -> None:
    """A run continues forward: resuming an older checkpoint into a run directory that holds newer ones would
    overwrite them (checkpoint names carry no version suffix)."""
    if not has_checkpoint(run_dir):
        return
    try:
        newest = newest_checkpoint(run_dir)
    except CheckpointError:
        return  # nothing there loads: nothing good to overwrite
    saved = check_checkpoint(ckpt_path, allow_sharded=True).get("global_step")
    if saved is not None and newest.step is not None and int(saved) < newest.step:
        raise RunDirError(f"{run_dir} holds a newer checkpoint ({newest.path.name}, step {newest.step}) than "
                          f"{ckpt_path} (step {int(saved)}); resume it with --ckpt_path last, or start from "
                          f"{ckpt_path} under another --run_name")


def check_resume_compatible(ckpt: dict, path: str | Path, arch: dict, batch_size: int, seq_len: int,
                            world_size: int, inexact_data_resume: bool) -> list[str]:
    """Refuse resuming a different model; refuse a changed batch size, sequence length or device count (they
    change which data each later step sees) unless ``inexact_data_resume``, in which case say what it breaks."""
    if ckpt.get("sharded"):
        return []  # its metadata stays in the shards; Lightning's own loading checks them
    check_same_model(ckpt, path, arch)
    saved_data = ckpt.get("datamodule_hyper_parameters") or {}
    saved_world = (ckpt.get("parcae") or {}).get("world_size")
    changes = [f"{name} {old} -> {new}" for name, old, new in
               (("data.batch_size", saved_data.get("batch_size"), batch_size),
                ("data.seq_len", saved_data.get("seq_len"), seq_len),
                ("device count", saved_world, world_size)) if old is not None and old != new]
    if not changes:
        return []
    if not inexact_data_resume:
        raise RunDirError(f"resuming {path} with {', '.join(changes)}: the data loader position cannot carry over; "
                          "keep the run's settings, or pass --inexact_data_resume true to resume the model and "
                          "optimizer with a different data order")
    return [f"resuming with {', '.join(changes)} (--inexact_data_resume): later steps see a different data order "
            "than an uninterrupted run would"]


def set_aside_unreadable(paths: list[Path]) -> Optional[str]:
    """Rename unreadable checkpoints to ``<name>.unreadable`` so the resumed run writes ``last.ckpt`` and its
    ``step=`` files under their own names again, while the damaged bytes are kept; nothing is deleted."""
    moved = []
    for path in paths:
        target = path.with_name(path.name + ".unreadable")
        try:
            path.rename(target)
        except OSError as err:
            raise storage_error("(renaming) the unreadable checkpoint", path, err) from None
        moved.append(target.name)
    return f"kept the unreadable checkpoint(s) as {', '.join(moved)}" if moved else None


def set_aside_failed_start(run_dir: str | Path) -> Optional[str]:
    """Move the files of a run that never wrote a checkpoint into ``attempt-<n>/`` so a new start begins clean;
    returns a note (None when there was nothing to move)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or has_checkpoint(run_dir):
        return None
    leftovers = [p for p in run_dir.iterdir() if p.name != LOCK_FILE and not p.name.startswith("attempt-")]
    if not leftovers:
        return None
    n = 1
    while (run_dir / f"attempt-{n}").exists():
        n += 1
    target = run_dir / f"attempt-{n}"
    try:
        target.mkdir()
        for p in leftovers:
            p.rename(target / p.name)
    except OSError as err:
        raise storage_error("files of the earlier attempt into", target, err) from None
    return f"{run_dir} held files of a start that wrote no checkpoint; moved them to {target}"
