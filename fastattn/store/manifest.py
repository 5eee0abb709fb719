"""The commit record, `_fastattn/manifest.json`: typed, and checked field by field when read.

Readers trust the manifest, never the array shapes: its `committed` batch count and
`max_length` say what is valid, so whatever a crash left past the last commit is invisible.
Each ingested file is a `FileEntry` (by absolute path: source name, size, mtime, content
hash, batch range, status, layout, the dump's dtype). The JSON is written as it always was
(`indent=1`, fields in the same order), so stores written before read and write unchanged.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ..choices import STORE_DTYPES
from ..errors import StoreError
from .schema import FORMAT_VERSION


def now() -> str:
    """The time records carry (UTC, to the second)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Status(enum.Enum):
    """What a file entry's batch range means."""

    INGESTED = "ingested"  # the file's samples are the batches start..stop-1
    DUPLICATE = "duplicate"  # same content as the file `duplicate_of`, whose batches it names: nothing stored twice
    UNKNOWN = "unknown"  # a status this fastattn does not know (kept as written; check reports it)


_DUPLICATE_OF = "duplicate of "


@dataclass
class FileEntry:
    """One ingested file, as the manifest records it under the file's key (its absolute path)."""

    size: int
    mtime_ns: int
    content_hash: str
    start: int
    stop: int
    status: Status = Status.INGESTED
    duplicate_of: str | None = None  # with DUPLICATE: the key of the file it duplicates
    source: str | None = None  # its name relative to its run's inputs (absent in stores of before)
    layout: str | None = None
    dtype: str | None = None  # the dump's own dtype: check applies the row-sum tolerance ingest applied
    tokens: bool | None = None  # whether the dump had token strings (None: not recorded, stores of before)
    unknown_status: str = ""  # with UNKNOWN: the status as written
    extra: dict = field(default_factory=dict)  # fields this fastattn does not know, written back as read

    @property
    def ingested(self) -> bool:
        return self.status is Status.INGESTED

    @property
    def status_text(self) -> str:
        """The status as the manifest writes it: "ingested", "duplicate of KEY", ..."""
        if self.status is Status.INGESTED:
            return "ingested"
        return f"{_DUPLICATE_OF}{self.duplicate_of}" if self.status is Status.DUPLICATE else self.unknown_status

    def source_name(self, key: str) -> str:
        """The `source` its batches show (entries of stores written before file keys were
        absolute paths have no source: the key itself)."""
        return key if self.source is None else self.source

    def to_json(self) -> dict:
        body = {} if self.source is None else {"source": self.source}
        body.update(size=self.size, mtime_ns=self.mtime_ns, content_hash=self.content_hash, start=self.start,
                    stop=self.stop, status=self.status_text)
        if self.layout is not None:
            body["layout"] = self.layout
        if self.dtype is not None:
            body["dtype"] = self.dtype
        if self.tokens is not None:
            body["tokens"] = self.tokens
        return {**body, **self.extra} if self.extra else body

    @classmethod
    def from_json(cls, where: str, body) -> FileEntry:
        """An entry from its JSON; a StoreError naming the field (`where`) when one is wrong.
        (Written for speed: a manifest holds an entry per file, read by every command.)"""
        if type(body) is not dict or not all(type(body.get(name)) is kind for name, kind in _FILE_ENTRY.items()):
            _require(where, body, _FILE_ENTRY)  # says what is wrong
        optional = [body.get(name) for name in _FILE_OPTIONAL]
        if not all(value is None or type(value) is kind for value, kind in zip(optional, _FILE_OPTIONAL.values())):
            _require(where, body, _FILE_OPTIONAL, optional=True)
        status = body["status"]
        if status == "ingested":
            kind, duplicate_of, unknown = Status.INGESTED, None, ""
        elif status.startswith(_DUPLICATE_OF):
            kind, duplicate_of, unknown = Status.DUPLICATE, status[len(_DUPLICATE_OF) :], ""
        else:
            kind, duplicate_of, unknown = Status.UNKNOWN, None, status
        extra = {} if body.keys() <= _KNOWN else {k: v for k, v in body.items() if k not in _KNOWN}
        return cls(body["size"], body["mtime_ns"], body["content_hash"], body["start"], body["stop"], kind, duplicate_of,
                   *optional, unknown, extra)


@dataclass
class Manifest:
    """The commit record: committed batches, the store's shape, every ingested file."""

    committed: int = 0
    layers: int = 0
    heads: int = 0
    max_length: int = 0
    dtype: str = "float32"
    batch_chunk: int = 1
    files: dict[str, FileEntry] = field(default_factory=dict)  # absolute path -> its entry
    ingests: list[dict] = field(default_factory=list)  # one entry per ingest run
    cross: list | None = None  # [query, key] of a cross-attention store
    stats_committed: int = 0  # the `stats` group's commit (schema.STATS)
    stats_k: int = 0
    #: statistics captured straight from a model (`fastattn.live`): the store holds no `attention`
    #: array, its file entries are texts (keyed by content hash), and its statistics cannot be recomputed
    stats_only: bool = False
    #: the `kept` group's commit (schema.KEPT): full maps of these store layers x heads, in a stats-only store
    kept_committed: int = 0
    kept_layers: list[int] = field(default_factory=list)
    kept_heads: list[int] = field(default_factory=list)

    def to_json(self) -> bytes:
        body = {"format": "fastattn-manifest", "version": FORMAT_VERSION, **self.__dict__}
        body["files"] = {key: entry.to_json() for key, entry in self.files.items()}
        if not self.stats_only:
            del body["stats_only"]  # manifests of stores with attention are written as they always were
        if not (self.kept_committed or self.kept_layers):
            for name in ("kept_committed", "kept_layers", "kept_heads"):
                del body[name]  # and so are those of stores that keep no maps
        return json.dumps(body, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse and validate a manifest; a damaged one (cut short, not JSON, a field of the
        wrong type) is a StoreError saying what is wrong, without the path (callers add it)."""
        try:
            body = json.loads(data)
        except ValueError as exc:  # also bytes that are not UTF-8
            raise StoreError(f"damaged: not valid JSON ({exc})") from None
        if not isinstance(body, dict) or body.get("format") != "fastattn-manifest":
            raise StoreError("not a fastattn manifest")
        try:
            _check_body(body)
            files = {key: FileEntry.from_json(f"files['{key}']", entry) for key, entry in body["files"].items()}
        except _Damaged as exc:
            raise StoreError(f"damaged: {exc}") from None
        manifest = cls(**{k: v for k, v in body.items() if k in cls.__dataclass_fields__ and k != "files"})
        manifest.files = files
        manifest.ingests = manifest.ingests or []
        return manifest

    def claimed(self) -> int:
        """End of the batch ranges the ingested files claim (0 when none)."""
        return max((e.stop for e in self.files.values() if e.ingested), default=0)


# ---------------------------------------------------------------- validation

#: Readers trust the manifest, so every field is checked once, here, before anyone uses it.
_COUNTS = ("committed", "layers", "heads", "max_length", "batch_chunk", "stats_committed", "stats_k", "kept_committed")
_REQUIRED = ("committed", "layers", "heads", "max_length", "dtype", "batch_chunk", "files")
_FILE_ENTRY = {"size": int, "mtime_ns": int, "content_hash": str, "start": int, "stop": int, "status": str}
_FILE_OPTIONAL = {"source": str, "layout": str, "dtype": str, "tokens": bool}  # in FileEntry's field order
_KNOWN = frozenset(_FILE_ENTRY) | frozenset(_FILE_OPTIONAL)
_INGEST_ENTRY = {"time": str, "files": int, "batches": int, "rejected": int, "seconds": (int, float)}


class _Damaged(Exception):
    """The first thing wrong with a manifest."""


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _require(where: str, entry, spec: dict, optional: bool = False) -> None:
    if not isinstance(entry, dict):
        raise _Damaged(f"{where} must be a mapping, not {type(entry).__name__}")
    for name, kind in spec.items():
        value = entry.get(name)
        if optional and value is None:
            continue
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise _Damaged(f"{where}['{name}'] is {value!r:.40}, not {getattr(kind, '__name__', 'a number')}")


def _check_body(body: dict) -> None:
    for name in _COUNTS:
        if name in body and not _is_count(body[name]):
            raise _Damaged(f"'{name}' is {body[name]!r:.40}, not a count (a whole number >= 0)")
    for name in ("kept_layers", "kept_heads"):
        value = body.get(name, [])
        if not (isinstance(value, list) and all(_is_count(v) for v in value)):
            raise _Damaged(f"'{name}' is {value!r:.40}, not a list of counts")
    if not isinstance(body.get("stats_only", False), bool):
        raise _Damaged(f"'stats_only' is {body['stats_only']!r:.40}, not true or false")
    if body.get("dtype", "float32") not in STORE_DTYPES:
        raise _Damaged(f"'dtype' is {body['dtype']!r:.40}, not float32 or float16")
    missing = [name for name in _REQUIRED if name not in body]
    if missing:
        raise _Damaged(f"{', '.join(repr(name) for name in missing)} missing")
    if body["batch_chunk"] < 1 or (body["committed"] and min(body["layers"], body["heads"], body["max_length"]) < 1):
        raise _Damaged("'batch_chunk', 'layers', 'heads' and 'max_length' must be at least 1")
    if not isinstance(body["files"], dict):
        raise _Damaged(f"'files' is a {type(body['files']).__name__}, not a mapping of file entries")
    ingests = body.get("ingests") or []
    if not isinstance(ingests, list):
        raise _Damaged(f"'ingests' is a {type(ingests).__name__}, not a list")
    for i, entry in enumerate(ingests):
        _require(f"ingests[{i}]", entry, _INGEST_ENTRY)
    cross = body.get("cross")
    if cross is not None and not (isinstance(cross, list) and len(cross) == 2 and all(_is_count(v) and v for v in cross)):
        raise _Damaged(f"'cross' is {cross!r:.40}, not [query, key]")
