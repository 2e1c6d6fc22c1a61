"""Client strings in error messages and logs: quoted, and cut to a bounded length (a 1 MB model name must not
become a 1 MB error detail or log line)."""

#: how much of a client's string an error message quotes
QUOTE_CHARS = 64


def quote(text: str | bytes, limit: int = QUOTE_CHARS) -> str:
    """``repr`` of a client-supplied string, cut to ``limit`` characters (with its full length said)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} {'bytes' if isinstance(text, bytes) else 'characters'})"


__all__ = ["quote", "QUOTE_CHARS"]
