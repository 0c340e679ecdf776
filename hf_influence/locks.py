"""One run at a time per `work_dir`: a lock file held for the run, so that two runs started together on one folder
cannot write their warm-ups and stores over each other (the second is refused in one line naming the holder).

The lock is an OS file lock (`filelock`: fcntl on POSIX, msvcrt on Windows), which the OS drops when its process
dies, so a lock left by a crashed run is taken over by the next run without any staleness rule. Who holds it is
written beside it (`work_dir.lock.json`: process id, host, start time) for the refusal message only.

Under a multi-process launch (accelerate, torchrun) the launch is one run: process 0 takes the lock for all, and
a refusal is raised on every process (`distributed._step`).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from .extraction.distributed import process_state, run_on_main
from .errors import HFInfluenceError
from .extraction.store import atomic_write_json

LOCK_FILE, HOLDER_FILE = "work_dir.lock", "work_dir.lock.json"


class WorkDirLockedError(HFInfluenceError, RuntimeError):
    """Another run holds the work_dir; the message names it."""


@contextmanager
def work_dir_lock(work_dir: str | os.PathLike) -> Iterator[None]:
    """Hold `work_dir`'s lock for the block (creating the folder).

    Raises:
        WorkDirLockedError: another live process holds it (the message names its pid, host and start time).
    """
    folder = Path(work_dir)
    state = process_state()
    main = state is None or state.is_main_process
    lock = FileLock(folder / LOCK_FILE, timeout=0) if main else None

    def acquire() -> None:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire()
        except Timeout:
            raise WorkDirLockedError(
                f"work_dir {str(folder)!r} is in use by another run ({_holder(folder)}): wait for it to finish or "
                f"give this run another work_dir. (A run that died leaves no lock behind.)") from None
        atomic_write_json(folder / HOLDER_FILE, {"pid": os.getpid(), "host": socket.gethostname(),
                                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")})

    run_on_main(state, f"locking work_dir {folder}", acquire)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _holder(folder: Path) -> str:
    """The holder as its run wrote it, or what can be said without it."""
    try:
        holder = json.loads((folder / HOLDER_FILE).read_text())
        return f"process {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its process did not say which"
