"""The checks a gateway setting declares next to its default (``setting(..., check=at_least(1))``).

Each validator takes a setting's value (never None: an unset optional setting is not checked) and returns what
is wrong with it, or None; :class:`~oodguard.serve.settings.SettingsError` prefixes the setting's name and
variable. They live apart from :class:`~oodguard.serve.settings.Settings` so that its fields read as a list of
settings; like it, this module imports no numpy at import time (the CLI builds its parser from the settings).
"""

from __future__ import annotations

from typing import Any, Callable

#: the schemes of a queue URL (``queue_url``)
QUEUE_SCHEMES = ("sqlite", "redis", "rediss")

#: a setting's constraint: what is wrong with a value, or None
Check = Callable[[Any], "str | None"]


def rule(holds: Callable[[Any], bool], must: str) -> Check:
    """Fine when ``holds(value)``; else "``must``, got VALUE". NaN holds no comparison, so it is refused."""
    def check(value: Any) -> str | None:
        return None if holds(value) else f"{must}, got {value}"
    return check


def at_least(low: float, note: str = "") -> Check:
    """``value >= low``; ``note`` (what the boundary means) is shown in brackets."""
    return rule(lambda value: value >= low, f"must be >= {low}" + (f" ({note})" if note else ""))


def positive(value: Any) -> str | None:
    """``value > 0``."""
    return None if value > 0 else f"must be > 0, got {value}"


def in_range(low: float, high: float, unit: str = "", note: str = "") -> Check:
    """``low <= value <= high``; ``unit`` follows the bounds, ``note`` is shown in brackets."""
    return rule(lambda value: low <= value <= high,
                f"must be within {low}..{high}{f' {unit}' if unit else ''}" + (f" ({note})" if note else ""))


def fraction(value: Any) -> str | None:
    """A share: ``0 <= value <= 1``."""
    return None if 0.0 <= value <= 1.0 else f"must be within [0, 1], got {value}"


def size_at_least(low: int) -> Check:
    """A size that cannot work below ``low`` (bytes)."""
    return rule(lambda value: value >= low, f"must be at least {low}")


def finite_seconds(note: str) -> Check:
    """A finite number of seconds >= 0; ``note`` says what 0 means."""
    return rule(lambda value: 0 <= value < float("inf"), f"must be a number of seconds >= 0 ({note})")


def one_of(choices: tuple[str, ...] | Callable[[], tuple[str, ...]], listed: bool = False) -> Check:
    """``value in choices`` (a function: looked up when the check runs, for choices whose module imports numpy).
    The message quotes them, "expected 'a' or 'b'", or with ``listed`` lists them, "expected one of a, b"."""
    def check(value: Any) -> str | None:
        names = tuple(choices()) if callable(choices) else choices
        if value in names:
            return None
        if listed:
            return f"expected one of {', '.join(names)}, got {value!r}"
        quoted = [repr(name) for name in names]
        alternatives = " or ".join(filter(None, [", ".join(quoted[:-1]), quoted[-1]]))  # 'a', 'b' or 'c'
        return f"expected {alternatives}, got {value!r}"
    return check


def host_port(value: str) -> str | None:
    """``HOST:PORT`` with a port within 0..65535."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        return f"expected HOST:PORT, got {value!r}"
    return None


def score_names(value: tuple[str, ...]) -> str | None:
    """At least one score, none empty or repeated."""
    if not value or any(not name for name in value):
        return "name at least one score, e.g. 'sisome' or 'sisome,energy'"
    if len(set(value)) != len(value):
        return f"repeated score in {list(value)}"
    return None


def distinct_names(value: tuple[str, ...]) -> str | None:
    """Scores (possibly none), none empty or repeated."""
    if any(not name for name in value) or len(set(value)) != len(value):
        return f"empty or repeated score in {list(value)}"
    return None


def queue_url_form(value: str) -> str | None:
    """"" (queue_path decides), ``sqlite:///PATH`` naming a file, or ``redis[s]://HOST:PORT/DB``."""
    if not value:
        return None
    scheme = value.partition("://")[0].lower() if "://" in value else ""
    if scheme not in QUEUE_SCHEMES:
        return (f"expected sqlite:///PATH (relative to the working directory), sqlite:////ABSOLUTE/PATH or "
                f"redis://HOST:PORT/DB, got {value!r}")
    if scheme == "sqlite":
        from oodguard.queues.factory import sqlite_path

        try:
            sqlite_path(value)
        except ValueError as exc:
            return str(exc)
    return None


def full_policies() -> tuple[str, ...]:
    """What a full queue may do (:data:`oodguard.queues.base.FULL_POLICIES`)."""
    from oodguard.queues.base import FULL_POLICIES  # numpy: not while the CLI builds its parser

    return tuple(FULL_POLICIES)


def bearer_token(value: str) -> str | None:
    """A token as it is sent: no whitespace at either end, no line break ("": none)."""
    if value and (value != value.strip() or any(c in value for c in "\r\n")):
        return "must not hold whitespace at either end or line breaks"
    return None
