"""The exceptions fastattn raises on purpose: each carries one line a user can act on."""


class FastattnError(Exception):
    """A problem with the user's input or store, explained in one line (no traceback needed)."""


class DumpError(FastattnError):
    """A dump file that cannot be ingested; the message is the reason, without the path."""


class StoreError(FastattnError):
    """A store that is missing, foreign, locked or inconsistent."""


def printable(text: str) -> str:
    """`text` on one line: control characters (a newline in a file name) shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors can be long), or its type's name."""
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__
