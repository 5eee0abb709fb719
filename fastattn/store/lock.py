"""One writer at a time: the flock on `_fastattn/lock`, and who holds it."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket

from ..errors import StoreError
from .location import Location
from .manifest import now
from .schema import LOCK


class Lock:
    """One writer at a time: the operating system's advisory lock (`flock`) on
    `_fastattn/lock`, held for the whole run.

    The kernel drops an flock when its holder exits, however it dies, so a dead process
    can never hold the lock and a reused pid can never look like a writer. The file also
    records pid, host, time and purpose, for the message a refused writer prints. Where
    the filesystem has no flock, an exclusive create with that record stands in, and a
    record naming a process that no longer runs on this host is taken over. Object stores
    have neither: remote stores rely on one writer by convention (README).
    """

    def __init__(self, location: Location, purpose: str):
        self.location = location
        self.purpose = purpose
        self.path = location.local_path(LOCK)  # None: an object store, which has no lock
        self._fd: int | None = None

    def _record(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": now(), "purpose": self.purpose}).encode()

    def __enter__(self) -> Lock:
        if self.path is None:
            return self
        try:
            self._fd = _flock(self.path)
        except BlockingIOError:
            raise self._busy(lock_holder(self.location) or {}) from None
        except NotImplementedError:  # no flock on this filesystem
            self._fd = None
            self._enter_exclusive_create()
            return self
        except OSError as exc:
            raise StoreError(f"{self.location}: cannot take the lock ({exc.strerror or exc})") from None
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, self._record(), 0)
        except OSError as exc:
            self.__exit__()
            raise StoreError(f"{self.location}: cannot take the lock ({exc.strerror or exc})") from None
        return self

    def _busy(self, holder: dict) -> StoreError:
        return StoreError(
            f"{self.location}: being written by {holder.get('purpose', 'another fastattn')}"
            f" (pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')});"
            " wait for it to finish"
        )

    def _enter_exclusive_create(self) -> None:
        for _attempt in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_lock_record(self.path)
                if holder is not None and _alive(holder):
                    raise self._busy(holder) from None
                _unlink(self.path)
                continue
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(self._record())
            except OSError as exc:
                _unlink(self.path)
                raise StoreError(f"{self.location}: cannot take the lock ({exc.strerror or exc})") from None
            return
        raise StoreError(f"{self.location}: could not take the lock {self.path}")

    def __exit__(self, *exc) -> None:
        if self.path is None:
            return
        # unlink while still holding the flock: a writer waiting on this file then finds it
        # gone (its inode check fails) and retries on a fresh one, so no two ever hold it
        _unlink(self.path)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not self.location.exists("zarr.json"):
            # nothing was created: leave no trace, so the path stays usable for a store
            for folder in (os.path.dirname(self.path), self.location.local_path("")):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)


#: errno values of a filesystem that has no flock: fall back to exclusive create.
_NO_FLOCK_ERRNO = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _flock(path: str) -> int:
    """Open `path` and take its flock without waiting; the fd holds it until closed.

    Raises BlockingIOError while another process holds it. Loops when the file was
    unlinked or replaced between open and lock (its holder released it that way)."""
    while True:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue  # a releasing writer removed the empty folder between the two calls
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in _NO_FLOCK_ERRNO:
                    raise NotImplementedError from None
                raise
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)


def lock_holder(location: Location) -> dict | None:
    """The record of the writer holding the store's lock now, or None when nobody does.

    A lock file that nobody holds (its writer died) is no holder: the next writer takes
    it over. An unreadable record of a held lock is an empty dict."""
    path = location.local_path(LOCK)
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_lock_record(path) or {}
        except OSError as exc:
            if exc.errno not in _NO_FLOCK_ERRNO:
                raise
            holder = read_lock_record(path)  # no flock here: the record and the pid tell
            return holder if holder is not None and _alive(holder) else None
        return None
    finally:
        os.close(fd)


def read_lock_record(path: str) -> dict | None:
    """The pid/host/time/purpose record in a lock file, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            record = json.load(f)
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None  # empty or unreadable: a writer killed between create and write


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _alive(holder: dict) -> bool:
    """For filesystems without flock only: does the recorded process still run?"""
    if holder.get("host") != socket.gethostname():
        return True  # cannot tell for another host: assume it is still writing
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True
