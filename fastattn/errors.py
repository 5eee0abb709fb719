"""The exceptions fastattn raises on purpose: each carries one line a user can act on."""


class FastattnError(Exception):
    """A problem with the user's input or store, explained in one line (no traceback needed).

    `parameter`: the argument the problem is about, when there is one. The message then reads
    `parameter: reason` and names no command-line flag; the CLI shows the flag instead."""

    def __init__(self, message: str, *, parameter: str | None = None):
        super().__init__(f"{parameter}: {message}" if parameter else message)
        self.reason, self.parameter = message, parameter


class DumpError(FastattnError):
    """A dump file that cannot be ingested; the message is the reason, without the path."""


class StoreError(FastattnError):
    """A store that is missing, foreign, locked or inconsistent."""


class ChecksumError(StoreError):
    """A chunk whose bytes fail their crc32c checksum: readers that know what the chunk holds
    say what to do about it (`fastattn.stats.read_errors`)."""


def printable(text: str) -> str:
    """`text` on one line: control characters (a newline in a file name) shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors can be long), or its type's name."""
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


def plural(word: str, n: int | None = None) -> str:
    """`word`'s plural, or `n` and the word in the number `n` needs ("1 head", "3 batches")."""
    many = word + ("es" if word.endswith("ch") else "s")
    return many if n is None else f"{n} {word if n == 1 else many}"


def check_index(dim: str, value, size: int) -> int:
    """`value` as a valid position along `dim` (of `size`), or a one-line FastattnError."""
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise FastattnError(f"{dim} must be an integer, not {value!r}") from None
    if index != value or not 0 <= index < size:
        has = f"{plural(dim, size)} (0-{size - 1})" if size else f"no {plural(dim)}"
        raise FastattnError(f"{dim} {value} out of range: the store has {has}")
    return index
