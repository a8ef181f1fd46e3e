"""The run directory's lock: one pipeline at a time on a run directory."""
from __future__ import annotations

import json
import logging
import os
import socket
import time

from orchestration.errors import PipelineError
from pipeline.storage import TEMPORARY_MARK, RunDir

log = logging.getLogger("vim.pipeline")
LOCK = "_LOCK.json"


class RunLock:
    """Refuses a second pipeline on the same run directory while the first one's process lives.

    On a local disk taking the lock is atomic: the complete `_LOCK.json` is written to a temporary sibling and
    hard-linked to its name (`os.link` fails when the name exists), so of any number of starters exactly one
    wins and a reader never sees a partial file. A lock whose holder is gone (a dead pid on this host, or this
    very process) is taken over under an exclusive `flock` of the run directory, which the kernel releases
    when its holder dies: the lock is re-read under it and deleted only if it still names the dead holder, then
    the link is tried again. A lock naming another host is trusted (its process cannot be checked from here).

    On a bucket (`gs://`, `s3://`: `pyarrow.fs` has no exclusive create) it is best effort: the lock is written
    whole (temporary object + move), then re-read after `BUCKET_SETTLE_S`; a starter that finds another's lock
    there gives way. Two starters whose existence checks and writes both fall within that window of each other
    can still both win; start one pipeline per bucket run directory at a time."""

    BUCKET_SETTLE_S = 2.0
    ATTEMPTS = 20

    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}

    def _holder_alive(self, holder: dict) -> bool:
        if holder.get("host") != self.me["host"]:
            return True  # cannot check another machine's processes: trust the lock
        if holder.get("pid") == self.me["pid"]:
            return False  # this process's own leftover (a Ray worker reused after a crash): ours to take
        try:
            os.kill(int(holder["pid"]), 0)
            return True
        except (ProcessLookupError, ValueError, KeyError, TypeError):
            return False
        except PermissionError:
            return True

    def _in_use(self, holder: dict) -> PipelineError:
        return PipelineError(
            f"run directory {self.run_dir.location} is in use by pid {holder.get('pid')} on "
            f"{holder.get('host')}; wait for it, or delete {LOCK} there if that process is gone")

    def _read_local(self, path: str) -> dict | None:
        """The holder in the lock file, None when there is none; unreadable content is an error."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(data)
            if isinstance(holder, dict):
                return holder
        except ValueError:
            pass
        raise PipelineError(f"{LOCK} in {self.run_dir.location} is unreadable (written by an older version?); "
                            "delete it if no pipeline runs there")

    def _dir_flock(self):
        """An exclusive flock of the run directory for a takeover (released by the kernel if we die)."""
        import fcntl
        fd = os.open(self.run_dir.root, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            raise
        return fd

    def _take_local(self) -> None:
        path = self.run_dir.path(LOCK)
        temp = f"{path}{TEMPORARY_MARK}{os.getpid()}-{os.urandom(4).hex()}"
        with open(temp, "w") as f:
            json.dump(self.me, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            for _ in range(self.ATTEMPTS):
                try:
                    os.link(temp, path)  # atomic, complete, and fails if the name exists
                    return
                except FileExistsError:
                    pass
                holder = self._read_local(path)
                if holder is None:
                    continue  # released in the meantime
                if self._holder_alive(holder):
                    raise self._in_use(holder)
                fd = self._dir_flock()
                try:  # re-check under the flock: only a dead holder's lock is removed, and only once
                    holder = self._read_local(path)
                    if holder is not None:
                        if self._holder_alive(holder):
                            raise self._in_use(holder)
                        os.remove(path)
                        log.warning("run lock of dead pid %s on %s taken over", holder.get("pid"),
                                    holder.get("host"))
                finally:
                    os.close(fd)
            raise PipelineError(f"could not take {LOCK} in {self.run_dir.location}: it changed hands "
                                f"{self.ATTEMPTS} times while trying")
        finally:
            os.remove(temp)

    def _take_bucket(self) -> None:
        if self.run_dir.exists(LOCK):
            holder = self.run_dir.read_json(LOCK)
            if self._holder_alive(holder):
                raise self._in_use(holder)
        self.run_dir.write_json(self.me, LOCK)
        time.sleep(self.BUCKET_SETTLE_S)  # a starter racing us has written by now: the last write stays
        holder = self.run_dir.read_json(LOCK) if self.run_dir.exists(LOCK) else None
        if holder != self.me:
            raise PipelineError(f"run directory {self.run_dir.location} was locked just now by another "
                                f"pipeline (pid {(holder or {}).get('pid')} on {(holder or {}).get('host')})")

    def __enter__(self) -> "RunLock":
        if self.run_dir.is_local:
            self._take_local()
        else:
            self._take_bucket()
        return self

    def __exit__(self, *exc) -> None:
        """Deletes the lock only while it is still this one's (not one taken over after a manual delete)."""
        mine = self.me
        if self.run_dir.is_local:
            try:
                if self._read_local(self.run_dir.path(LOCK)) == mine:
                    os.remove(self.run_dir.path(LOCK))
            except (PipelineError, FileNotFoundError):
                pass
        elif self.run_dir.exists(LOCK) and self.run_dir.read_json(LOCK) == mine:
            self.run_dir.delete(LOCK)
