"""Reading a store chunk by chunk, never a whole array: a chunk that is missing or does not
decode becomes a problem naming its key (e.g. `attention/c.3.2.0.0.0`), not an exception."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from typing import TYPE_CHECKING

from ..store import schema
from .problems import DROP, reason

if TYPE_CHECKING:
    from .checker import Checker


class ChunkReader:
    """Reads for one check: counts the chunks decoded and keeps the bad ones (repair deletes
    those it rewrites: a corrupt chunk cannot be read back for a partial write)."""

    def __init__(self, checker: Checker):
        self.c = checker
        self.bad_chunks: dict[str, list[str]] = defaultdict(list)  # array path -> keys

    def exists(self, array, coords) -> bool:
        return self.c.loc.exists(chunk_key(array, coords))

    def _bad(self, array, key: str, message: str, *, fix, batch) -> None:
        self.c.add(key, message, fix=fix, batch=batch, kind="chunk")
        self.bad_chunks[array.path].append(key)

    def values(self, array, upto=None, *, fix, required=False, axis=0):
        """(region, values) over `array` below `upto` along `axis`, several small chunks per read
        (up to ~CHUNK_BYTES); a read that fails is retried chunk by chunk to name the bad ones,
        which yield None. Damage is reported as affecting the batches from the chunk's first one."""
        itemsize = getattr(array.dtype, "itemsize", 0) or 64  # variable-length strings: a guess
        chunk_bytes = max(1, math.prod(array.chunks) * itemsize)
        per_read = max(1, schema.CHUNK_BYTES // chunk_bytes)
        groups: dict[tuple, list] = defaultdict(list)  # chunks sharing every index but `axis`'s
        for coords, region in chunks(array, upto, axis):
            groups[coords[:axis] + coords[axis + 1 :]].append((coords, region))
        for members in groups.values():
            for i in range(0, len(members), per_read):
                part = members[i : i + per_read]
                missing = required and any(not self.exists(array, c) for c, _ in part)
                if not missing and len(part) > 1:
                    first, last = part[0][1], part[-1][1]
                    region = tuple(
                        slice(first[d].start, last[d].stop) if d == axis else first[d] for d in range(len(first))
                    )
                    try:
                        values = array[region]
                    except Exception:
                        pass
                    else:
                        self.c.result.chunks += len(part)
                        yield region, values
                        continue
                for coords, region in part:
                    batch = region[axis].start if fix == DROP else None
                    yield region, self.read(array, coords, region, fix=fix, batch=batch, required=required)

    def read(self, array, coords, region, *, fix, batch=None, required=False):
        """One chunk's values, or None (and a problem naming its key) when it is missing or corrupt."""
        key = chunk_key(array, coords)
        if required and not self.c.loc.exists(key):
            span = f" (batches {region[0].start}..{region[0].stop - 1})"
            self._bad(array, key, f"missing chunk: its committed values are lost{span}", fix=fix, batch=batch)
            return None
        try:
            values = array[region]
        except Exception as exc:
            self._bad(array, key, f"does not decode ({reason(exc)})", fix=fix, batch=batch)
            return None
        self.c.result.chunks += 1
        return values

    def read_region(self, array, region, what: str):
        """A region of whole chunks (one batch-chunk of one layer); each chunk is required."""
        grid = [range(s.start // c, math.ceil(s.stop / c)) for s, c in zip(bounds(array, region), array.chunks)]
        keys = [(coords, chunk_key(array, coords)) for coords in itertools.product(*grid)]
        batch = region[0].start
        missing = [key for _, key in keys if not self.c.loc.exists(key)]
        for key in missing:
            self._bad(array, key, f"missing chunk: {what} are lost", fix=DROP, batch=batch)
        if missing:
            return None
        try:
            values = array[region]
        except Exception:
            for coords, key in keys:  # find which chunks fail
                sub = tuple(slice(i * c, min((i + 1) * c, s.stop)) for i, c, s in zip(coords, array.chunks, bounds(array, region)))
                try:
                    array[sub]
                except Exception as exc:
                    self._bad(array, key, f"does not decode ({reason(exc)}): {what}", fix=DROP, batch=batch)
            return None
        self.c.result.chunks += len(keys)
        return values


def members(group, names) -> dict:
    """`group[name]` for each of `names`: the Array or Group, or the exception `group[name]`
    raises (KeyError when there is none). zarr reads their metadata documents all at once, one
    pass of its event loop, not one round trip (and its thread hops) after another: ~35
    statistics arrays took a quarter of a local check this way, and far more over a network."""
    import asyncio

    import zarr
    from zarr.core.array import AsyncArray
    from zarr.core.sync import sync

    async def fetch():
        return await asyncio.gather(*(group._async_group.getitem(name) for name in names), return_exceptions=True)

    got = sync(fetch())
    for obj in got:
        if isinstance(obj, BaseException) and not isinstance(obj, Exception):
            raise obj  # e.g. KeyboardInterrupt: as `group[name]` would
    return {name: obj if isinstance(obj, BaseException) else zarr.Array(obj) if isinstance(obj, AsyncArray) else zarr.Group(obj)
            for name, obj in zip(names, got)}


def bounds(array, region) -> list[slice]:
    return [slice(*s.indices(n)[:2]) for s, n in zip(region, array.shape)]


def chunks(array, upto: int | None = None, axis: int = 0):
    """(chunk coords, region) of every chunk of `array`, along `axis` only below `upto`."""
    shape = list(array.shape)
    if upto is not None:
        shape[axis] = min(shape[axis], upto)
    grid = [range(math.ceil(s / c)) for s, c in zip(shape, array.chunks)]
    for coords in itertools.product(*grid):
        yield coords, tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(coords, array.chunks, shape))


def chunk_key(array, coords) -> str:
    return f"{array.path}/{array.metadata.encode_chunk_key(coords)}"
