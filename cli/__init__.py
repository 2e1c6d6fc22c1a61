"""The `oodguard` command, on top of every wing: :mod:`.parser` builds the parser of every subcommand, and each
subcommand's runner lives with its kind (:mod:`.commands`: train, export, evaluate, validate-repo, serve;
:mod:`.harvest`: harvest and labels; :mod:`.clients`: predict and loadgen; :mod:`.queue_command`: queue). Each
imports its side lazily, so serving never imports torch; :func:`main` turns errors into one line (exit 2) and
Ctrl-C into one line saying what was left (:mod:`.interrupts`)."""

from __future__ import annotations

import os
import sys

from .clients import loadgen_command, predict_command
from .commands import evaluate_command, export_command, serve_command, train_command, validate_command
from .harvest import harvest_command, labels_command
from .interrupts import folder_state, interrupted_message, watched_output
from .parser import build_parser, parse_args
from .queue_command import run_queue

COMMANDS = {"serve": serve_command, "train": train_command, "export": export_command, "validate-repo": validate_command, "evaluate": evaluate_command,
            "predict": predict_command, "loadgen": loadgen_command, "harvest": harvest_command, "labels": labels_command,
            "queue": run_queue}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["triton"]:  # its own parser: every option goes to it, --help included
        from oodguard.triton_local import main as triton_main

        return triton_main(argv[1:])
    args = parse_args(build_parser(), argv)
    before = None
    try:
        watched = watched_output(args)
        if watched is not None:
            before = folder_state(*watched)
        status = COMMANDS[args.command](args)
        sys.stdout.flush()  # a reader that went away shows here, not as a traceback at exit
        return status
    except (ValueError, FileNotFoundError) as exc:
        print(f"oodguard {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`oodguard queue list | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line saying what was left, not a traceback; 128 + SIGINT as shells do
        print(interrupted_message(args, before), file=sys.stderr)
        return 130


__all__ = ["main", "build_parser", "COMMANDS"]
