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
