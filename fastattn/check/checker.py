"""One check of a store: the state its passes share, its bookkeeping, the order of the passes;
and `run_check`, which with `repair` goes check, repair, check again."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import zarr

from .. import store
from . import derived, layout, metadata, records, values
from .problems import DROP, FORCE_HINT, MAX_PER_KIND, CheckResult, Problem, Stop, reason
from .reader import ChunkReader
from .repair import repair

#: check, repair, check again: a repair can reveal what it could not see before (chunks behind
#: restored metadata), so `--repair` goes round at most this many times.
REPAIR_ROUNDS = 3


class Checker:
    """What the passes found so far, and what later passes (and repair) need of it."""

    def __init__(self, location: store.Location, *, own_lock: bool = False, only_header: bool = False):
        self.loc = location
        self.own_lock = own_lock
        self.only_header = only_header
        self.result = CheckResult(store=str(location))
        self.reader = ChunkReader(self)
        self.counts: dict[str, int] = defaultdict(int)
        self.hidden: dict[str, Problem] = {}
        self.root: dict = {}
        self.manifest: store.Manifest | None = None
        self.group: zarr.Group | None = None
        self.arrays: dict[str, zarr.Array] = {}
        self.unreadable: set[str] = set()  # arrays whose shape or chunks make their values unreadable as they are
        self.dims: dict[str, int] = {}  # the sizes the attention's dims should have
        self.trusted = True  # False while the attention's shape or chunks contradict the manifest unrepaired
        self.claimed = 0  # end of the batches the manifest's file entries claim
        self.lengths = np.zeros(0, dtype=np.int64)  # per committed batch; -1 where unknown
        self.tolerance = np.zeros(0)  # row-sum tolerance per committed batch
        self.writer: dict | None = None  # the lock's holder, when a live writer works
        self.stray: list[str] = []
        self.coords_to_rebuild: set[str] = set()
        self.restore: dict[str, tuple[dict, str]] = {}  # array -> (metadata --repair writes, what it says)

    def add(self, where: str, message: str, *, fix=None, batch=None, kind=None, subject=None):
        if fix == DROP and FORCE_HINT not in message:
            message += FORCE_HINT
        problem = Problem(where, message, fix=fix, batch=batch, subject=subject)
        if kind is not None:
            self.counts[kind] += 1
            if self.counts[kind] > MAX_PER_KIND:
                hidden = self.hidden.setdefault(kind, Problem(where, "", fix=fix, batch=batch))
                if batch is not None:
                    hidden.batch = batch if hidden.batch is None else min(hidden.batch, batch)
                return
        self.result.problems.append(problem)

    def held(self, name: str) -> int:
        """Committed batches of `name` whose values can be read as the array is."""
        array = self.arrays.get(name)
        if array is None or name in self.unreadable:
            return 0
        return min(self.manifest.committed, array.shape[0])

    def run(self) -> CheckResult:
        try:
            self._check()
        except Stop:
            pass
        except Exception as exc:  # a broken store can make any read fail: one line, never a traceback
            self.add(str(self.loc), f"cannot be read further ({reason(exc)})")
        for kind, hidden in self.hidden.items():
            more = self.counts[kind] - MAX_PER_KIND
            hidden.where = kind
            hidden.message = f"{more} more problems of this kind (only the first {MAX_PER_KIND} are listed)"
            self.result.problems.append(hidden)
        return self.result

    def _guarded(self, where: str, work, *args, essential: bool = False):
        """Run one pass; what it did not foresee becomes a problem naming `where`."""
        try:
            return work(self, *args)
        except Stop:
            raise
        except Exception as exc:
            self.add(where, f"could not be checked ({reason(exc)})")
            if essential:
                raise Stop from None
            return None

    def _check(self) -> None:
        metadata.check_root(self)
        if self.only_header:
            return
        if not self.own_lock:
            metadata.check_lock(self)
        if self.writer is None:
            metadata.check_leftovers(self)
        manifest = self.manifest = metadata.read_manifest(self)
        if manifest is None:
            raise Stop  # nothing committed (or no record of it): nothing else can be trusted or compared
        try:
            self.group = store.open_group(self.loc, "r")
        except Exception as exc:  # a zarr.json that zarr cannot read
            self.add("zarr.json", f"zarr cannot open the store ({reason(exc)})")
            raise Stop from None
        self.result.committed = manifest.committed
        self._guarded("zarr.json", metadata.check_schema, essential=True)
        self._guarded("attention", layout.check_shapes, essential=True)
        self._guarded("coordinates", layout.check_coordinates)
        if self.writer is None:
            self._guarded("zarr.json", metadata.check_consolidated)
        owner, names = self._guarded(store.MANIFEST, records.check_files, essential=True)
        self._guarded("length", records.check_per_batch, owner, names, essential=True)
        if "attention" in self.arrays:  # a store of statistics only has none
            self._guarded("attention", values.check_attention)
        for spec in store.ARRAYS:  # the other batched arrays (`token`): every committed chunk decodes
            if spec.batched and spec.name not in ("attention", *records.CHECKED) and spec.name in self.arrays:
                self._guarded(spec.name, values.check_decodes, spec.name)
        for spec in store.DERIVED.values():
            self._guarded(spec.name, derived.check_derived, spec)
        self._guarded("zarr.json", metadata.check_hierarchy)


def store_problems(path, *, repair: bool = False, force: bool = False, storage_options: dict | None = None) -> list[Problem]:
    """Check a store (see `fastattn.check`); with `repair`, fix what can be fixed.

    Returns every problem found; the ones `repair` fixed carry what was done in
    `.repaired`. `force` (with `repair`) drops damaged committed batches.
    """
    return run_check(path, repair=repair, force=force, storage_options=storage_options).problems


def run_check(path, *, repair: bool = False, force: bool = False, storage_options: dict | None = None) -> CheckResult:
    """`store_problems` with the counts of what was read (for the CLI's summary line)."""
    location = store.as_location(path, storage_options)
    if not repair:
        return Checker(location).run()
    return _check_and_repair(location, force)


def _check_and_repair(location: store.Location, force: bool) -> CheckResult:
    first = Checker(location, only_header=True).run()
    if first.problems:  # not a fastattn store: nothing to repair, and nothing to lock
        return first
    stale = metadata.lock_problem(location)
    location.check_writable()
    problems = [stale] if stale else []
    if stale:
        stale.repaired = "taken over and removed"
    after = None
    with store.Lock(location, "fastattn check --repair"):
        for _round in range(REPAIR_ROUNDS):
            found = Checker(location, own_lock=True)
            result = found.run()
            done = repair(location, found, force)
            for p in result.problems:
                known = next((q for q in problems if p.same(q)), None)
                if known is None:
                    problems.append(p)
                elif p.repaired:
                    known.repaired = p.repaired
            if not done:  # nothing left that repair can do: this check is the last word
                after = CheckResult(result.store, [Problem(p.where, p.message, fix=p.fix) for p in result.problems],
                                    result.committed, result.chunks, result.batches)
                break
        if after is None:
            after = Checker(location, own_lock=True).run()
    for p in problems:
        if p.repaired and p is not stale and any(p.same(q) for q in after.problems):
            p.repaired = ""  # the repair did not take
    problems += [q for q in after.problems if not any(p.same(q) for p in problems)]
    after.problems = problems
    return after
