"""One run per output directory: an advisory ``flock`` on ``<output>/.harness.lock``.

Two runs on the same store would both run every pending trial and interleave their
logs. The lock is held for the whole run and released by the kernel when the process
ends, however it ends (kill -9 included), so a stale lock never blocks a later run. A
run that stops before writing anything (bad input found by the pre-flight) removes the
directories it created for the lock.
"""
from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class Busy(RuntimeError):
    """Another run holds the output directory's lock."""


@contextmanager
def run_lock(output: str | os.PathLike, wait: bool = False) -> Iterator[Path]:
    """Hold the lock of ``output`` (created if needed); :class:`Busy` if another process
    holds it, unless ``wait``, which blocks until it is free."""
    out = Path(output)
    created = [p for p in [out, *out.parents] if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    path = out / ".harness.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            if not wait:
                raise Busy(f"{out}: another harness run is using this output ({holder}); wait for it to "
                           f"finish, run again with --wait, or give this suite another 'output'") from None
            print(f"waiting for the other run on {out} ({holder}) to finish...", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}, since {time.strftime('%H:%M:%S')}".encode(), 0)
        yield path
    finally:
        os.close(fd)          # releases the lock
        if created and [p.name for p in out.iterdir()] == [path.name]:
            path.unlink(missing_ok=True)          # a run that stopped before writing anything
            for p in created:                     # leaves no trace (deepest first)
                try:
                    p.rmdir()
                except OSError:
                    break
