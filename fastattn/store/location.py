"""Where a store lives: a local folder or an fsspec URL, behind one interface.

`Location(path_or_url, storage_options)` gives a `LocalLocation` or a `RemoteLocation`;
every file operation ingest, check and repair need is a method here, so no other module
asks which kind it has or walks a store's folder itself. Keys are `/`-separated paths
relative to the store's root (`attention/zarr.json`, `_fastattn/manifest.json`).
"""

from __future__ import annotations

import abc
import contextlib
import errno
import os
import shutil
import stat
import uuid
from pathlib import Path

import zarr

from ..errors import StoreError, first_line
from .schema import LOCK, META


def is_url(location) -> bool:
    return "://" in str(location)


class Location(abc.ABC):
    """Where a store lives, and how to read, write and list it there."""

    url: str
    storage_options: dict
    root: str  # the store's folder: an absolute local path, or the filesystem's path of the URL

    def __new__(cls, location=None, storage_options=None):
        if cls is Location:  # the factory: the kind follows from the path
            cls = RemoteLocation if is_url(os.fspath(location)) else LocalLocation
        return super().__new__(cls)

    def __init__(self, location: str | os.PathLike, storage_options: dict | None = None):
        self.url = os.fspath(location)
        self.storage_options = storage_options or {}

    def __str__(self) -> str:
        return self.url

    def key_url(self, key: str) -> str:
        """A key as messages name it: the store's path or URL, then the key."""
        return f"{self.url.rstrip('/')}/{key}"

    # every operation below is the subclasses'

    @abc.abstractmethod
    def check_reachable(self) -> None:
        """One clear line (a StoreError) for a store that cannot be reached."""

    @abc.abstractmethod
    def check_writable(self) -> None:
        """Before a writer takes the lock: one line for a store that cannot be written."""

    @abc.abstractmethod
    def zarr_store(self, read_only: bool = False):
        """The zarr store of this location."""

    @abc.abstractmethod
    def exists(self, key: str = "") -> bool:
        """Whether `key` (or, without one, the store's folder) exists."""

    @abc.abstractmethod
    def read(self, key: str) -> bytes | None:
        """The bytes of `key`, None when it is missing."""

    @abc.abstractmethod
    def write_atomic(self, key: str, data: bytes) -> None:
        """Write `key` so a reader sees the old or the new bytes, never a torn file."""

    @abc.abstractmethod
    def write_chunk(self, key: str, buffers) -> None:
        """Write one chunk file whole from `buffers` (written one after the other), as zarr's
        stores do: a kill leaves the old or the new bytes. No fsync, like zarr: the manifest's
        commit is what is made durable."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete one key (nothing when it is missing)."""

    @abc.abstractmethod
    def remove_prefix(self, prefix: str) -> None:
        """Delete everything under `prefix` (a whole group)."""

    @abc.abstractmethod
    def remove(self) -> None:
        """Delete everything under the store but the lock (only ever a store this run created)."""

    @abc.abstractmethod
    def keys(self) -> list[str]:
        """Every key stored, sorted."""

    @abc.abstractmethod
    def leftovers(self) -> list[str]:
        """The temporary files of writes that were interrupted, sorted."""

    @abc.abstractmethod
    def is_new(self) -> bool:
        """Missing, empty, or holding only fastattn's own folder (a first ingest that stopped early)."""

    @abc.abstractmethod
    def nbytes(self, prefix: str = "") -> int:
        """Bytes stored under `prefix` (the size on disk of an array's chunks)."""

    @abc.abstractmethod
    def local_path(self, key: str) -> str | None:
        """The file system path of `key`, for what only a local file can do (the flock); None remotely."""


def as_location(location, storage_options: dict | None = None) -> Location:
    """`location` itself when it is a Location, else the Location of that path or URL."""
    return location if isinstance(location, Location) else Location(location, storage_options)


class LocalLocation(Location):
    """A store in a local folder. Writes of whole files go through a temporary name and a
    rename (zarr's local store does the same for every chunk), so a killed process leaves
    no torn file, only temporary ones (`leftovers`)."""

    def __init__(self, location: str | os.PathLike, storage_options: dict | None = None):
        super().__init__(location, storage_options)
        if self.storage_options:
            raise StoreError(f"{self.url}: storage_options apply to store URLs (s3://...), not to a local path")
        self.root = os.path.abspath(self.url)

    def _file(self, key: str) -> str:
        return os.path.join(self.root, key) if key else self.root

    def check_reachable(self) -> None:
        """A local store path must be a folder or not exist yet (ingest creates it): not a file,
        a broken symbolic link or a loop."""
        url, root = self.url, self.root
        try:
            mode = os.stat(root).st_mode
        except FileNotFoundError:
            if os.path.islink(root):
                raise StoreError(f"{url}: a symbolic link to {os.readlink(root)}, which does not exist") from None
            return
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StoreError(f"{url}: a loop of symbolic links, which leads to no folder") from None
            if exc.errno == errno.ENOTDIR:
                raise StoreError(f"{url}: a part of the path is a file, not a folder") from None
            raise StoreError(f"{url}: cannot be opened ({exc.strerror or exc})") from None
        if not stat.S_ISDIR(mode):
            raise StoreError(f"{url}: a file, not a store (a store is a folder)")

    def check_writable(self) -> None:
        """A read-only mount or no permission is one line, instead of the first write failing."""
        target = self.root
        while not os.path.exists(target):  # a new store: its nearest existing parent must be writable
            target = os.path.dirname(target)
        folders = [target, os.path.join(target, META)] if target == self.root else [target]
        for folder in folders:
            if os.path.isdir(folder) and not os.access(folder, os.W_OK):
                why = "it is on a read-only file system" if os.statvfs(folder).f_flag & os.ST_RDONLY else "no permission to write it"
                where = "" if folder == self.root else f" ({folder})"
                raise StoreError(f"{self.url}: cannot write the store{where}: {why}; nothing was changed")

    def zarr_store(self, read_only: bool = False):
        return zarr.storage.LocalStore(self.root, read_only=read_only)

    def exists(self, key: str = "") -> bool:
        return os.path.exists(self._file(key))

    def read(self, key: str) -> bytes | None:
        try:
            return Path(self.root, key).read_bytes()
        except FileNotFoundError:
            return None

    def write_atomic(self, key: str, data: bytes) -> None:
        target = Path(self.root, key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)  # e.g. a full disk: leave no half-written file behind
            raise

    def write_chunk(self, key: str, buffers) -> None:
        # a temporary `*.partial` renamed over the key: at worst a `*.partial` that `check --repair` removes
        write_file(self._file(key), buffers)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._file(key))

    def remove_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._file(prefix), ignore_errors=True)

    def remove(self) -> None:
        for dirpath, dirs, files in os.walk(self.root, topdown=False):
            for name in files:
                path = os.path.join(dirpath, name)
                if path != self._file(LOCK):  # the lock goes when it is released
                    os.remove(path)
            for name in dirs:
                with contextlib.suppress(OSError):  # the lock's folder stays until then
                    os.rmdir(os.path.join(dirpath, name))

    def _walk(self):
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                yield name, os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/")

    def keys(self) -> list[str]:
        return sorted(key for _, key in self._walk())

    def leftovers(self) -> list[str]:
        # `*.partial`: zarr's local store's write killed before its rename; `.*.tmp`: write_atomic's
        return sorted(key for name, key in self._walk()
                      if name.endswith(".partial") or (name.startswith(".") and name.endswith(".tmp")))

    def is_new(self) -> bool:
        if not os.path.exists(self.root):
            return True
        # a `*.partial` is zarr's temporary file of a write killed before its rename (the root zarr.json)
        return os.path.isdir(self.root) and {n for n in os.listdir(self.root) if not n.endswith(".partial")} <= {META}

    def nbytes(self, prefix: str = "") -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(self._file(prefix)):
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
        return total

    def local_path(self, key: str) -> str:
        return self._file(key)


def write_file(path: str, buffers) -> None:
    """`path` replaced whole by the bytes of `buffers`, through a temporary file renamed over it
    (zarr's LocalStore writes the same way), its folder made when missing."""
    tmp = f"{path}.{uuid.uuid4().hex}.partial"
    try:
        f = open(tmp, "wb")
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        f = open(tmp, "wb")
    try:
        with f:
            for buffer in buffers:
                f.write(buffer)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # e.g. a full disk: leave no half-written file behind
        raise


class RemoteLocation(Location):
    """A store at an fsspec URL (`s3://`, `gs://`, `memory://`, ...). Every write of a whole
    object is one PUT, which S3-compatible stores make atomic, so nothing temporary is left."""

    def __init__(self, location: str | os.PathLike, storage_options: dict | None = None):
        super().__init__(location, storage_options)
        self.fs, self.root = self._filesystem()

    def _filesystem(self):
        """The fsspec filesystem of the URL, or one line on an unknown protocol, a missing
        package or a nested storage option given as a plain value."""
        import fsspec

        for protocol in self.url.split("://", 1)[0].split("::"):
            if protocol not in fsspec.available_protocols():
                raise StoreError(f"{self.url}: unknown protocol '{protocol}://' (fsspec has no filesystem for it)")
        for name, value in self.storage_options.items():
            if name.endswith("_kwargs") and not isinstance(value, dict):
                raise StoreError(
                    f"{self.url}: storage_options['{name}'] must be a mapping of options, not {value!r:.40}"
                    f" (e.g. {{'{name}': {{'region_name': ...}}}})"
                )
        try:
            return fsspec.core.url_to_fs(self.url, **self.storage_options)
        except ImportError as exc:  # e.g. "Install s3fs to access S3"
            raise StoreError(f"{self.url}: {first_line(exc)}") from None
        except (TypeError, ValueError) as exc:
            raise StoreError(f"{self.url}: storage options not accepted ({first_line(exc)})") from None

    def _path(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}" if key else self.root

    def check_reachable(self) -> None:
        """A missing bucket, no or refused credentials, an endpoint that does not answer,
        storage options the filesystem rejects: one line each."""
        bucket = self.root.split("/", 1)[0]
        try:
            self.fs.ls(bucket, refresh=True)
        except FileNotFoundError:
            raise StoreError(f"{self.url}: the bucket '{bucket}' does not exist") from None
        except PermissionError as exc:
            raise StoreError(f"{self.url}: access denied ({first_line(exc)}); check the credentials") from None
        except OSError as exc:
            raise StoreError(f"{self.url}: cannot reach the store ({first_line(exc)})") from None
        except (TypeError, AttributeError) as exc:  # an option of the wrong kind, found when the client is made
            raise StoreError(f"{self.url}: storage options not accepted ({first_line(exc)})") from None
        except Exception as exc:  # each backend has its own errors (botocore's NoCredentialsError, ...)
            if "credential" in type(exc).__name__.lower():
                raise StoreError(f"{self.url}: no credentials found ({first_line(exc)}); give key and secret in the"
                                 " storage options, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
            raise StoreError(f"{self.url}: cannot reach the store ({type(exc).__name__}: {first_line(exc)})") from None

    def check_writable(self) -> None:
        """Object stores have no cheap probe; their first write reports it."""

    def zarr_store(self, read_only: bool = False):
        return zarr.storage.FsspecStore.from_url(self.url, storage_options=self.storage_options or None, read_only=read_only)

    def exists(self, key: str = "") -> bool:
        return self.fs.exists(self._path(key))

    def read(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(key))
        except FileNotFoundError:
            return None

    def write_atomic(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(key), data)  # one PUT: atomic on S3-compatible stores

    def write_chunk(self, key: str, buffers) -> None:
        self.fs.pipe_file(self._path(key), b"".join(buffers))  # one PUT

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(key))

    def remove_prefix(self, prefix: str) -> None:
        if self.fs.exists(self._path(prefix)):
            self.fs.rm(self._path(prefix), recursive=True)

    def remove(self) -> None:
        self.remove_prefix("")

    def keys(self) -> list[str]:
        root = self.root.rstrip("/")
        return sorted(path[len(root) + 1 :] for path in self.fs.find(root))

    def leftovers(self) -> list[str]:
        return []  # every write is one PUT: nothing temporary

    def is_new(self) -> bool:
        names = self.fs.ls(self.root, detail=False) if self.fs.exists(self.root) else []
        return all(n.rstrip("/").rsplit("/", 1)[-1] == META for n in names)

    def nbytes(self, prefix: str = "") -> int:
        return int(self.fs.du(self._path(prefix)))

    def local_path(self, key: str) -> None:
        return None
