"""One lock per run (student run folder, teacher cache entry), so that several ``kdbench run``
processes on the same output folder or teacher cache never train a run twice or write one
record concurrently.

``fcntl.flock`` on ``<run folder>/.lock``: the kernel drops the lock when its holder exits, even
by SIGKILL, so there are no stale locks to clean up. The file holds the holder's pid and host
(for messages only) and is never deleted (deleting a flock file races with a new holder).
POSIX only; on network file systems flock is as reliable as the file system's locking.
"""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from kdbench.store import WRITE_HINTS, StoreError

LOCK = ".lock"


def holder_id() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; False if another process holds it."""
        if self.fd is not None:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot create the run lock {self.path}: {exc.strerror or exc}; "
                             f"{WRITE_HINTS.get(exc.errno, 'check that the folder is writable (and not a file)')}"
                             " and run the same command again") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, (holder_id() + "\n").encode())
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)  # closing drops the flock

    def holder(self) -> str:
        """Who holds the lock, best effort (for messages)."""
        try:
            return self.path.read_text().strip() or "another process"
        except OSError:
            return "another process"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False
