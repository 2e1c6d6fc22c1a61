"""``oodguard serve``'s flags, generated from the :class:`~oodguard.serve.settings.Settings` fields.

Each field gives its flag's name, metavar and help text (what it is, its default and what that means, its
``OODGUARD_*`` variable): nothing about a setting is typed twice. Imports no numpy: the CLI builds its
parser from here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .settings import ENV_PREFIX, Settings

#: binary units for byte-sized defaults in help texts
_BINARY_UNITS = (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024))


def _shown(name: str, value: Any) -> str:
    """A default as a help text prints it: lists comma-separated, byte sizes with their binary unit."""
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and name.endswith("_bytes"):
        for unit, size in _BINARY_UNITS:
            if value >= size and value % size == 0:
                return f"{value} = {value // size} {unit}"
    return str(value)


def flag_help(field: dataclasses.Field) -> str:
    """The ``--help`` text of a setting's flag: what it is, its default (and what that means), its variable."""
    meta, env = field.metadata, ENV_PREFIX + field.name.upper()
    if field.default is dataclasses.MISSING:
        return f"{meta['help']} (required; env {env})"
    value, note = field.default, meta["note"]
    if value is None or value == "":
        default = f"default: {note}" if note else "default: none"
    else:
        joint = "; " if ":" in note else ": "  # "(default 600; 0: off)", "(default 0: off)"
        default = f"default {_shown(field.name, value)}" + (joint + note if note else "")
    return f"{meta['help']} ({default}; env {env})"


def serve_flags() -> list[tuple[str, str, str]]:
    """(flag, metavar, help) of every setting, in the order of :class:`Settings`: ``oodguard serve``'s flags."""
    return [("--" + f.name.replace("_", "-"), f.metadata["metavar"], flag_help(f)) for f in dataclasses.fields(Settings)]
