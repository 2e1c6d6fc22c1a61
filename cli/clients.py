"""`oodguard predict` and `oodguard loadgen`: the clients of a running gateway."""

from __future__ import annotations

import argparse


def add_client_parsers(sub) -> None:
    """``predict`` and ``loadgen`` (oodguard.clients; imported only when run). Token: ``OODGUARD_TOKEN``."""
    predict = sub.add_parser("predict", help="classify image files with a running gateway",
                             description="Send each image file to the gateway and print its class, probability, OOD "
                             "decision and the scores that decided it. Bearer token from OODGUARD_TOKEN.")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="PNG/JPEG files")
    loadgen = sub.add_parser("loadgen", help="drive a gateway with traffic and report throughput, latency, flagged share",
                             description="Send Predict requests from a dataset at a concurrency (and optional rate) for a "
                             "duration; report throughput, latency percentiles, errors by status and the flagged share. "
                             "Bearer token from OODGUARD_TOKEN.")
    loadgen.add_argument("--data", required=True, help="dataset spec ('digits', IDX, .npz, folder) or synthetic:uniform|blobs[:N]")
    loadgen.add_argument("--concurrency", type=int, default=4, help="requests in flight (default %(default)s)")
    loadgen.add_argument("--rate", type=float, default=0.0,
                         help="requests per second in all (default %(default)s: unlimited)")
    loadgen.add_argument("--duration", type=float, default=10.0, help="seconds, at most 3600 (default %(default)s)")
    loadgen.add_argument("--requests", type=int, default=0,
                         help="stop after N requests (default %(default)s: the duration decides)")
    loadgen.add_argument("--ood-fraction", type=float, default=0.0,
                         help="share of requests drawn from --ood-data (default %(default)s)")
    loadgen.add_argument("--ood-data", default="synthetic:uniform", help="OOD dataset spec (default %(default)s)")
    loadgen.add_argument("--batch-size", type=int, default=1, help="images per request (default %(default)s)")
    loadgen.add_argument("--seed", type=int, default=0, help="seed of the images drawn and of which requests are OOD "
                         "(default %(default)s)")
    loadgen.add_argument("--allow-remote", action="store_true", help="allow a target that is not a loopback address")
    for command in (predict, loadgen):
        command.add_argument("--target", default="127.0.0.1:50051", help="gateway HOST:PORT (default %(default)s)")
        command.add_argument("--model", default="", help="model name (default: the server's)")
        command.add_argument("--timeout", type=float, default=10.0 if command is predict else 5.0,
                             help="deadline per call, s (default %(default)s)")
        command.add_argument("--tls-ca", metavar="FILE", help="root certificate (PEM) when the gateway serves TLS")
        command.add_argument("--json", action="store_true", help="print JSON")
    predict.add_argument("--top-k", type=int, default=3, help="top classes per image (default %(default)s)")


def predict_command(args: argparse.Namespace) -> int:
    from oodguard.clients.predict import run

    return run(args)


def loadgen_command(args: argparse.Namespace) -> int:
    from oodguard.clients.loadgen import run

    return run(args)


#: ``oodguard serve`` flags: each maps to the Settings field of the same name (dashes -> underscores).
