"""Writing into run directories without leaving anything half-written, and storage faults in one line.

    from parcae.runs.storage import save_atomically, write_folder_atomically
    save_atomically(checkpoint_dict, run_dir / "last.ckpt")       # staged beside it, fsynced, renamed
    write_text_atomically(out_dir / "perplexity_x.json", text)      # a result file: complete or absent
    write_folder_atomically(out, lambda staging: ..., "output folder")

A kill at any moment leaves either the previous file or the new one under the final name; the staging files
(``.<name>.tmp-<pid>``, ``.<folder>.partial-<pid>-<id>``, removed by the next write once their process
is gone) start with a dot and are never taken for checkpoints.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import RunDirError, StorageError
from .layout import is_sharded_checkpoint

# Disk full, quota, file too large, read-only or permission: a write that failed for the storage, not the program.
WRITE_FAULT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)


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
        try:
            full = shutil.disk_usage(Path(path).parent).free < (16 << 20)
        except OSError:
            full = False
        reason = os.strerror(errno.ENOSPC) if full else \
            "the file system accepted only part of it (disk full, quota or file-size limit)"
    line = f"could not write {what} {path}: {reason}"
    if run_dir is not None:
        from .checkpoint import newest_good_checkpoint

        good = newest_good_checkpoint(run_dir)
        line += f"; last good checkpoint: {good}" if good else "; the run has no good checkpoint yet"
    return StorageError(line)


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


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def interrupt_behind(err: BaseException) -> Optional[BaseException]:
    """The Ctrl-C / SIGTERM (any BaseException that is not an Exception) that ``err`` was raised while handling, if
    any. torch.save turns an interrupt that lands inside its file writes into a RuntimeError ("unexpected pos"),
    which would otherwise read as a storage fault."""
    seen = err.__context__
    while seen is not None:
        if not isinstance(seen, Exception):
            return seen
        seen = seen.__context__
    return None


def _write_staged(path: Path, write: Callable[[Any], None], what: str, run_dir: Optional[str | Path] = None,
                  any_os_error: bool = False) -> None:
    """``write(file)`` into ``.<name>.tmp-<pid>`` beside ``path`` (binary), fsync, then ``os.replace``: a kill during
    the write leaves the previous file intact. Staging files left by killed processes are removed first; an
    interrupt that torch.save wrapped into a RuntimeError is re-raised as the interrupt. A storage fault (every
    OSError with ``any_os_error``) is one :class:`StorageError` naming the file and (``run_dir``) the run's last
    good checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        interrupt = interrupt_behind(err)
        if interrupt is not None:  # the user stopped us mid-write: that, not a disk fault (the staging file goes)
            raise interrupt from None
        if not (is_storage_fault(err) or (any_os_error and isinstance(err, OSError))):
            raise
        raise storage_error(what, path, err, run_dir=run_dir) from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    _fsync_dir(path.parent)


def save_atomically(obj: Any, path: str | Path, what: str = "checkpoint",
                    run_dir: Optional[str | Path] = None) -> None:
    """``torch.save(obj)`` to ``path`` through a staging file, fsync and a rename (:func:`_write_staged`): a kill
    during the save leaves the previous file intact; a full or read-only disk is one :class:`StorageError`."""
    import torch

    _write_staged(Path(path), lambda f: torch.save(obj, f), what, run_dir)


def copy_atomically(source: str | Path, target: str | Path, what: str = "file") -> None:
    """Copy ``source`` to ``target`` through a staging file and a rename (never a half-copied ``target``)."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except OSError as err:
        raise storage_error(what, target, err) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: str | Path, text: str, what: str = "result file") -> None:
    """Write ``text`` (UTF-8, as given: CSV keeps its \\r\\n) to ``path`` through a staging file and a rename: a
    kill or a full disk never leaves a half-written ``path`` (the previous version stays until the new one is
    complete)."""
    _write_staged(Path(path), lambda f: f.write(text.encode("utf-8")), what, any_os_error=True)


def check_new_folder(target: str | Path, what: str) -> None:
    """Refuse an output folder that exists as a file or holds files (``what``: the option that names it)."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise RunDirError(f"{target} is an existing file, not a folder; choose another {what}")
    if target.is_dir() and any(target.iterdir()):
        raise RunDirError(f"{target} already exists and is not empty; choose another {what} (or delete it)")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's live process / not a pid
        return pid > 0
    return True


def remove_stale_staging_folders(target: str | Path) -> list[Path]:
    """Remove the staging folders ``.<target name>.partial-<pid>-<id>`` beside ``target`` whose process is gone (a
    killed write); a live process's staging folder, another target's and other names are left alone."""
    target = Path(target)
    removed = []
    for staging in target.parent.glob(f".{target.name}.partial-*"):
        owner = staging.name[len(f".{target.name}.partial-"):].split("-")[0]
        if staging.is_dir() and owner.isdigit() and not _process_alive(int(owner)):
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
    return removed


def write_folder_atomically(target: str | Path, fill: Callable[[Path], None], what: str) -> None:
    """Create the folder ``target`` by filling a hidden staging folder beside it and renaming it into place;
    refuses a target that is a file or a folder with files (:func:`check_new_folder`). Staging folders of
    ``target`` left by killed writers are removed first (:func:`remove_stale_staging_folders`)."""
    target = Path(target)
    check_new_folder(target, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging_folders(target)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        fill(staging)
        if target.exists():  # an empty folder: replace it
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def results_dir_for(checkpoint: str | Path, output_dir: Optional[str | Path] = None) \
        -> tuple[Optional[Path], Optional[str]]:
    """Where an evaluation of ``checkpoint`` writes its results (the one rule every verb follows):

    - ``output_dir`` when given (created; one-line :class:`StorageError` when it cannot be written);
    - else the run directory: ``checkpoint`` itself when it is a run directory, else the folder holding the
      checkpoint file (or the sharded checkpoint folder), when it can be written;
    - else nowhere: ``(None, note)``, the note saying that results are only printed."""
    if output_dir:
        out = Path(output_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise storage_error("the output folder", out, err) from None
        if not writable_dir(out):
            raise StorageError(f"--output_dir {out} cannot be written")
        return out, None
    checkpoint = Path(checkpoint)
    run_dir = checkpoint if checkpoint.is_dir() and not is_sharded_checkpoint(checkpoint) else checkpoint.parent
    if writable_dir(run_dir):
        return run_dir, None
    return None, (f"{run_dir} is not writable: results are printed only (pass --output_dir to save them)")
