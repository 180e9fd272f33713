"""One writer per run: ``parcae fit`` holds an exclusive lock on ``<run>/.fit.lock`` for its lifetime.

    from parcae.runs.lock import RunLock
    with RunLock(run_dir) as lock:     # RunLockedError (one line, naming the holder) while another fit runs
        print(lock.note)               # None, or what happened to a lock left behind by a dead process

The lock is a ``flock``, which the kernel drops when its process dies however it dies, so a lock file whose lock
can be taken was left by a process that no longer holds it. The file records pid, host and boot id of the holder
so that the note about a left-behind lock is true: a pid on another machine, or from before a restart, is not
looked up here (pid 1 always runs, and pids are reused).
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Optional

from .errors import RunLockedError, StorageError
from .layout import LOCK_FILE
from .storage import describe_os_error

LOCK_NAME = LOCK_FILE
_HOLDER = re.compile(r"^pid (\d+) on (\S+)(?: \(boot ([0-9a-f-]+)\))?")


def boot_id() -> str:
    """This machine's boot id (Linux), '' where there is none: a pid recorded under another boot id is gone."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _is_lock_rank() -> bool:
    """Only the first process of a (multi-process, multi-node) run takes the lock; the others are its helpers."""
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK", "GROUP_RANK"):
        if os.environ.get(var, "0") not in ("", "0"):
            return False
    return True


def holder_record() -> str:
    """What this process writes into the lock file: ``pid N on HOST (boot ID)``."""
    boot = boot_id()
    return f"pid {os.getpid()} on {socket.gethostname()}" + (f" (boot {boot})" if boot else "")


def left_behind_note(run_dir: str | Path, record: str) -> str:
    """The note for a lock file whose lock was free: who left it, and what is known about that process."""
    m = _HOLDER.match(record)
    if not m:
        return f"took over the lock of {run_dir} (its lock file held {record[:80]!r}, and no process held the lock)"
    pid, host, boot = int(m.group(1)), m.group(2), m.group(3) or ""
    who = f"pid {pid} on {host}"
    if host != socket.gethostname():
        why = "another machine or container; it no longer holds the lock"
    elif boot and boot_id() and boot != boot_id():
        why = "before this machine restarted"
    elif _pid_runs(pid):
        why = f"which no longer holds it (pid {pid} runs, but not as the writer of this run)"
    else:
        why = "which is no longer running"
    return f"took over the lock of {run_dir} left by {who}, {why}"


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.fit.lock`` holding the owner's pid, host and boot id.

    A lock file whose lock can be taken was left by a process that no longer holds it: it is taken over (``note``
    says what is known of that process). The file is removed on release, so a clean exit leaves the run directory
    as it was.
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
            self.note = left_behind_note(self.run_dir, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (holder_record() + "\n").encode(), 0)
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
