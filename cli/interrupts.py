"""What an interrupted command says it left: the output folder of train and export, compared with what it was
when the command began."""

from __future__ import annotations

import argparse
from pathlib import Path


def watched_output(args: argparse.Namespace) -> tuple[Path, bool] | None:
    """(folder, recursive) that the command writes into, looked at before and after an interrupt so that the
    message says truthfully what was left: train writes two files into --out, export a version folder and the
    configs under --repository. None for the other commands."""
    if args.command == "train":
        return args.out, False
    if args.command == "export":
        return args.repository, True
    return None


def folder_state(folder: Path, recursive: bool) -> dict[str, tuple]:
    """What an interrupt is compared against: relative path → ("dir",) or ("file", size, mtime_ns) of the
    folder itself and what it holds (its direct entries, or everything below it when ``recursive``); an empty
    dict when it does not exist. Folders count by presence only: a temporary entry made and removed again
    changes a folder's mtime but leaves nothing behind."""
    state: dict[str, tuple] = {}
    if not folder.is_dir():
        return state
    for path in [folder, *(folder.rglob("*") if recursive else folder.iterdir())]:
        try:
            st = path.lstat()
        except OSError:  # removed meanwhile
            continue
        name = path.relative_to(folder).as_posix()
        state[name] = ("dir",) if path.is_dir() and not path.is_symlink() else ("file", st.st_size, st.st_mtime_ns)
    return state


def interrupted_message(args: argparse.Namespace, before: dict[str, tuple] | None) -> str:
    """The one line an interrupted command prints: for train and export, whether the output folder is as it
    was (compared with ``before``, its :func:`folder_state` when the command began; None: interrupted before
    the command began) or what changed in it, which may be partial."""
    head = f"oodguard {args.command}: interrupted"
    watched = watched_output(args)
    if watched is None:
        return head
    folder, recursive = watched
    after = folder_state(folder, recursive)
    before = after if before is None else before
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(name for name in set(before) & set(after) if before[name] != after[name])
    if not (added or removed or changed):
        return f"{head}; nothing was written ({folder} {'is unchanged' if after else 'was not created'})"

    def names(paths: list[str]) -> str:
        shown = [str(folder / p) if p != "." else str(folder) for p in paths[:4]]
        return ", ".join(shown) + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")

    parts = [f"{label} {names(paths)}" for label, paths in (("new:", added), ("changed:", changed),
                                                            ("removed:", removed)) if paths]
    return f"{head} while writing its output, which may be partial; {'; '.join(parts)}"
