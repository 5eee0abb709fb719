"""What a check reports: one `Problem` per thing wrong, what repair can do about it, and the
`CheckResult` of a whole run."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import first_line
from ..store import schema

#: At most this many lines per kind of problem (bad values, bad chunks...); the rest are counted.
MAX_PER_KIND = 10

# What --repair can do about a problem (its `fix`).
LOCK = "lock"  # remove a stale lock
STRAY = "stray"  # delete temporary files
PAST = "past"  # shrink the arrays to the committed (or claimed) batches
META = "meta"  # restore an array's metadata: its shape from the manifest, the rest from the consolidated copy
SOURCE = "source"  # rebuild source / source_index from the manifest
COORD = "coord"  # rebuild a coordinate array
CONSOLIDATED = "consolidated"  # refresh the consolidated metadata
ENTRY = "entry"  # remove a manifest entry that stores nothing (a broken duplicate record)
DROP = "drop"  # committed data is damaged: only --force drops it
# A derived group's problems have its name as their fix: uncommit it and remove it (it is recomputed).
STATS = schema.STATS.name
ROLLOUT = schema.ROLLOUT.name

FORCE_HINT = "; fastattn check --repair --force drops the batches from its file onwards"


@dataclass
class Problem:
    """One thing wrong with a store: where (a file, array or chunk key) and what."""

    where: str
    message: str
    repaired: str = ""  # what --repair did about it; empty while it remains
    fix: str | None = field(default=None, repr=False, compare=False)
    batch: int | None = field(default=None, repr=False, compare=False)  # first committed batch it affects
    subject: str | None = field(default=None, repr=False, compare=False)  # the manifest entry or array it is about

    def __str__(self) -> str:
        line = f"{self.where}: {self.message}"
        return f"{line} [repaired: {self.repaired}]" if self.repaired else line

    def same(self, other: Problem) -> bool:
        return self.where == other.where and self.message == other.message


@dataclass
class CheckResult:
    """Every problem found (repaired ones say how), and what was read to find them."""

    store: str
    problems: list[Problem] = field(default_factory=list)
    committed: int = 0
    chunks: int = 0  # chunks decoded
    batches: int = 0  # committed batches whose values were checked

    @property
    def remaining(self) -> list[Problem]:
        return [p for p in self.problems if not p.repaired]

    @property
    def ok(self) -> bool:
        return not self.remaining

    def summary(self) -> str:
        read = f"{self.committed} committed batches, {self.chunks} chunks decoded"
        if not self.problems:
            return f"{self.store}: ok ({read}, every value checked)"
        repaired = len(self.problems) - len(self.remaining)
        count = f"{len(self.problems)} problem{'s' * (len(self.problems) != 1)}"
        text = f"{self.store}: {count} ({repaired} repaired, {len(self.remaining)} remaining; {read})"
        if self.remaining and all(p.fix == DROP for p in self.remaining):
            return text + "; fastattn check --repair --force drops the damaged batches"
        if any(p.fix not in (None, DROP) for p in self.remaining):
            return text + "; fastattn check --repair fixes some of them"
        return text


class Stop(Exception):
    """Nothing further can be checked."""


#: A derived group zarr cannot open.
BROKEN = object()


def reason(exc: BaseException) -> str:
    """Why a read failed, in one line."""
    if "checksum" in str(exc).lower():
        return "crc32c checksum mismatch: the bytes on disk changed"
    return f"{type(exc).__name__}: {first_line(exc)}" if str(exc).strip() else type(exc).__name__
