"""``oodguard predict IMAGE...``: classify image files with a running gateway and say which scores decided.

Each file's encoded bytes are sent as they are (one request per file, so one bad file does not hide the
others). Prints per file the class, its probability, the OOD verdict, the deciding scores with their
thresholds and conformal p-values, and every other score that crossed its threshold; ``--json`` prints
a list of ``{"path", "prediction"}`` / ``{"path", "error"}`` objects. Exit 0 when every file was answered,
1 when a file was refused (e.g. INVALID_ARGUMENT: not an image), 2 when the gateway cannot be reached.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import grpc


def describe(path: str, p) -> str:
    d = p.decision
    verdict = "OOD" if d.ood else "in-distribution"
    deciding = ", ".join(
        f"{s}={p.scores[s]:.4g} {'>' if s in d.crossed else '<='} {d.thresholds[s]:.4g} (p-value {d.p_values[s]:.3g})"
        for s in d.deciding)
    others = [f"{s}={p.scores[s]:.4g} > {d.thresholds[s]:.4g}" for s in d.crossed if s not in d.deciding]
    lines = [f"{path}: class {p.class_name} (index {p.class_index}, probability {p.probability:.3f}) {verdict}",
             f"  decided by {d.mode}({deciding})" + (f"; driven by {d.driver} (p-value {d.p_values[d.driver]:.3g})"
                                                     if d.driver else ""),
             f"  other scores crossed: {', '.join(others) or 'none'}",
             f"  model {p.model} v{p.version}" + (f", queued as {p.record_id}" if p.record_id else "")]
    return "\n".join(lines)


def run(args) -> int:
    from .sdk import OODGuardClient, OODGuardError

    results = []
    status = 0
    token = os.environ.get("OODGUARD_TOKEN") or None
    with OODGuardClient(args.target, timeout=args.timeout, root_certificates=args.tls_ca, token=token) as client:
        for image in args.images:
            path = Path(image)
            if not path.is_file():
                results.append({"path": image, "error": {"code": "NOT_FOUND", "details": "no such file"}})
                status = max(status, 1)
                continue
            try:
                prediction = client.predict_one(path, model=args.model, top_k=args.top_k,
                                                metadata={"source": "oodguard-predict", "path": path.name})
            except OODGuardError as exc:
                if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    print(f"oodguard predict: cannot reach the gateway at {args.target}: {exc}", file=sys.stderr)
                    return 2
                results.append({"path": image, "error": {"code": exc.code.name, "details": exc.details}})
                status = max(status, 1)
                continue
            results.append({"path": image, "prediction": prediction})
    if args.json:
        print(json.dumps([{"path": r["path"], "prediction": r["prediction"].to_dict()} if "prediction" in r else r
                          for r in results], indent=1))
    else:
        for r in results:
            if "prediction" in r:
                print(describe(r["path"], r["prediction"]))
            else:
                print(f"{r['path']}: error {r['error']['code']}: {r['error']['details']}")
    return status


__all__ = ["run", "describe"]
