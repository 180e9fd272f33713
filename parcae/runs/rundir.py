"""The run directory of a training run: one writer (a lock), checkpoints checked before they are trusted, resume
from the newest checkpoint that loads, and storage faults reported in one line.

    from parcae.runs.rundir import RunLock, resume_checkpoint, check_checkpoint
    with RunLock(run_dir):                       # parcae fit holds this for its lifetime
        path, note = resume_checkpoint(run_dir)  # last.ckpt, or the newest step=*.ckpt that loads

Only ``parcae fit`` writes into a run directory (config.yaml, hparams.yaml, checkpoints, TensorBoard events);
evaluation verbs read it. docs/training.md states the guarantees. Nothing here imports Lightning, so the lock
can be taken (and tested) without it.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import zipfile
from pathlib import Path
from typing import Optional

from parcae.errors import UsageError

LOCK_NAME = ".fit.lock"
_STEP = re.compile(r"^step=(\d+)(?:-v(\d+))?\.ckpt$")


class RunDirError(UsageError):
    """A run directory or checkpoint that cannot be used as asked; the message is one line naming the file."""


class CheckpointError(RunDirError):
    """A file that is not a readable parcae checkpoint (missing, truncated, foreign, random bytes)."""


class RunLockedError(RunDirError):
    """Another live ``parcae fit`` writes this run directory."""


class StorageError(RunDirError):
    """Writing failed (disk full, read-only or missing folder); the message names what and the last good
    checkpoint."""


# -- one writer per run ---------------------------------------------------------------------------------------
def _is_lock_rank() -> bool:
    """Only the first process of a (multi-process, multi-node) run takes the lock; the others are its helpers."""
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK"):
        if os.environ.get(var, "0") not in ("", "0"):
            return False
    return True


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.fit.lock`` holding the owner's PID and host.

    The kernel drops the ``flock`` when its process dies, however it dies, so a lock file whose lock can be
    taken was left by a process that no longer runs: it is taken over (``note`` says so). The file is removed
    on release, so a clean exit leaves the run directory as it was.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.note: Optional[str] = None
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        import fcntl

        if self._fd is not None or not _is_lock_rank():
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"cannot create run directory {self.run_dir}: {describe_os_error(err)}") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise StorageError(f"cannot write to run directory {self.run_dir}: {describe_os_error(err)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLockedError(f"{self.run_dir} is being written by another parcae fit ({holder}); wait for "
                                     "it to finish or stop it, or choose another --run_name") from None
            try:  # the file may have been removed (released) between open and flock: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            break
        previous = _read_holder(fd)
        if previous:
            self.note = (f"took over the lock of {self.run_dir} left by {previous}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        _HELD.add(self)
        return self

    @property
    def held(self) -> bool:
        """False in the helper processes of a multi-process run, which leave the run directory to the first."""
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only folder by now: the flock still goes with the descriptor
        os.close(self._fd)
        self._fd = None
        _HELD.discard(self)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_HELD: set[RunLock] = set()


def release_held_locks() -> None:
    """Release every lock this process holds (the command calls this when it ends, however it ends)."""
    for lock in list(_HELD):
        lock.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    return text


# -- checkpoints ------------------------------------------------------------------------------------------------
def check_checkpoint(path: str | Path, allow_sharded: bool = False) -> dict:
    """Open a checkpoint lazily (memory-mapped, tensors and plain values only) and check it is a parcae Lightning
    checkpoint; return it. Every problem is a one-line :class:`CheckpointError` naming the file.

    A sharded (FSDP) checkpoint is a folder with ``meta.pt``: a resume accepts it as it is (``allow_sharded``;
    returns ``{"sharded": True}``), every other use needs the consolidated file."""
    import pickle

    import torch

    path = Path(path)
    if path.is_dir() and (path / "meta.pt").is_file():
        if allow_sharded:
            return {"sharded": True}
        raise CheckpointError(f"{path} is a sharded checkpoint folder: run `parcae consolidate {path.parent} "
                              f"--ckpt_name {path.name}` and pass the file it writes")
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read it ({describe_os_error(err)})") from None
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):
        if head == b"PK\x03\x04":
            raise CheckpointError(f"{path} is truncated or damaged ({size:,} bytes, the end of its zip archive is "
                                  "missing); it cannot be loaded")
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({size:,} bytes that are not a zip archive)")
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            first = "it holds Python objects beyond tensors and plain values"
        raise CheckpointError(f"{path} cannot be loaded as a checkpoint: {first[:200]}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is a PyTorch file but not a Lightning checkpoint (no state_dict)")
    if "arch" not in (ckpt.get("hyper_parameters") or {}):
        raise CheckpointError(f"{path} is a Lightning checkpoint but not a parcae one (no hyper_parameters.arch)")
    return ckpt


def check_same_model(ckpt: dict, path: str | Path, arch: dict) -> None:
    """Refuse a checkpoint whose model differs from the config's, naming both (and the first differences)."""
    saved = ckpt["hyper_parameters"]["arch"]
    diffs = [k for k in sorted(set(saved) | set(arch)) if k in saved and k in arch and saved[k] != arch[k]]
    if diffs:
        shown = ", ".join(f"{k} {saved[k]!r} vs {arch[k]!r}" for k in diffs[:4])
        raise CheckpointError(f"{path} holds model {saved.get('name')!r} but the config describes "
                              f"{arch.get('name')!r} ({shown}{', ...' if len(diffs) > 4 else ''})")


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """``step=*.ckpt`` files of a run directory, newest first (by step, then version)."""
    found = []
    for p in Path(run_dir).glob("step=*.ckpt"):
        m = _STEP.match(p.name)
        if m:
            found.append((int(m.group(1)), int(m.group(2) or 0), p))
    return [p for *_, p in sorted(found, reverse=True)]


def resume_checkpoint(run_dir: str | Path, unreadable: Optional[list[Path]] = None) -> tuple[Path, Optional[str]]:
    """``last.ckpt``, or when it is missing or unreadable the newest ``step=*.ckpt`` that loads; with a note saying
    which and why when it is not ``last.ckpt``. Raises :class:`CheckpointError` when none loads. The unreadable
    files newer than the one chosen are appended to ``unreadable``."""
    run_dir = Path(run_dir)
    last = run_dir / "last.ckpt"
    problems, skipped = [], []
    for path in [last, *step_checkpoints(run_dir)]:
        if path == last and not last.exists():
            problems.append("there is no last.ckpt")
            continue
        try:
            check_checkpoint(path, allow_sharded=True)
        except CheckpointError as err:
            problems.append(str(err).replace(str(path), path.name, 1))
            skipped.append(path)
            continue
        note = None if path == last else f"resuming from {path}: {'; '.join(problems)}"
        if unreadable is not None:
            unreadable.extend(skipped)
        return path, note
    what = "; ".join(problems) if len(problems) <= 3 else "; ".join(problems[:3]) + f"; and {len(problems) - 3} more"
    raise CheckpointError(f"{run_dir} has no checkpoint that loads ({what}); start a new run with another "
                          "--run_name")


def newest_good_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """For error messages: the checkpoint a resume would use, or None."""
    try:
        return resume_checkpoint(run_dir)[0]
    except CheckpointError:
        return None


def has_checkpoint(run_dir: str | Path) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / "last.ckpt").exists() or bool(step_checkpoints(run_dir))


# -- storage faults ---------------------------------------------------------------------------------------------
def describe_os_error(err: BaseException) -> str:
    """The reason of an OSError in words ("No space left on device"), without errno numbers or paths."""
    if isinstance(err, OSError) and err.errno is not None:
        return os.strerror(err.errno)
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def storage_error(what: str, path: str | Path, err: BaseException, run_dir: Optional[str | Path] = None) \
        -> StorageError:
    """One line: what failed to be written, why, and the last good checkpoint of the run (if any)."""
    reason = describe_os_error(err)
    if not isinstance(err, OSError):  # torch.save reports a short write as a position mismatch, without errno
        import shutil

        try:
            full = shutil.disk_usage(Path(path).parent).free < (16 << 20)
        except OSError:
            full = False
        reason = os.strerror(errno.ENOSPC) if full else \
            "the file system accepted only part of it (disk full, quota or file-size limit)"
    line = f"could not write {what} {path}: {reason}"
    if run_dir is not None:
        good = newest_good_checkpoint(run_dir)
        line += f"; last good checkpoint: {good}" if good else "; the run has no good checkpoint yet"
    return StorageError(line)


# Disk full, quota, file too large, read-only or permission: a write that failed for the storage, not the program.
WRITE_FAULT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)


def is_storage_fault(err: BaseException) -> bool:
    """Disk full, quota, file too large, read-only or permission errors (and torch.save's wrapping of them)."""
    if isinstance(err, OSError):
        return err.errno in WRITE_FAULT_ERRNOS + (errno.EIO, errno.ENOENT, errno.ENOTDIR)
    return isinstance(err, RuntimeError) and ("inline_container" in str(err) or "unexpected pos" in str(err))


def writable_dir(path: str | Path) -> bool:
    """Whether files can be created in ``path`` (tried, since ``os.access`` says yes to root on a read-only
    mount in some setups); creates and removes one temporary file, leaving the folder's contents as they were."""
    import tempfile

    try:
        fd, name = tempfile.mkstemp(prefix=".parcae-probe-", dir=path)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


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
    return Path(ckpt_path), []


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
    ``step=`` files under their own names again (Lightning would otherwise add ``-v1``); nothing is deleted."""
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
    leftovers = [p for p in run_dir.iterdir() if p.name != LOCK_NAME and not p.name.startswith("attempt-")]
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


def results_location(default_dir: str | Path, output_dir: Optional[str | Path] = None) \
        -> tuple[Optional[Path], Optional[str]]:
    """Where an evaluation writes its results: ``output_dir`` when given (created), else ``default_dir`` (the
    checkpoint's folder) when it can be written, else nowhere, with a note that results are only printed."""
    if output_dir:
        out = Path(output_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise storage_error("the output folder", out, err) from None
        if not writable_dir(out):
            raise StorageError(f"--output_dir {out} cannot be written")
        return out, None
    default_dir = Path(default_dir)
    if writable_dir(default_dir):
        return default_dir, None
    return None, (f"{default_dir} is not writable: results are printed only (pass --output_dir to save them)")
