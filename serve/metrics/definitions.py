"""What the gateway's metrics are: bucket bounds, label values, help texts, the intervals of the
state readers, and the histogram buckets and expected flag rate derived from a version's calibration."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from oodguard.calibration import ScoreThreshold

    from ..decision import DecisionPolicy
    from ..registry import ServedVersion


#: end-to-end and backend latency buckets, seconds
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))
#: calibration-score quantiles that become bucket boundaries of ``oodguard_score`` (the threshold is added)
SCORE_QUANTILES = (0.01, 0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.99)
#: boundaries beyond the largest calibration score, in units of its 5%..95% spread
SCORE_TAIL_STEPS = (0.25, 0.5, 1.0, 2.0, 4.0)
UNKNOWN_MODEL = "unknown"
#: queue statistics are read at most this often, seconds
QUEUE_STATS_MIN_INTERVAL_S = 1.0
#: ... and, while reads succeed, at most this share of the time (SQLite counts 100k records in ~0.2 s, holding
#: the queue's lock) but at least once per QUEUE_STATS_MAX_PERIOD_S
QUEUE_STATS_MAX_DUTY = 0.05
QUEUE_STATS_MAX_PERIOD_S = 10.0
#: a read running longer than this many QUEUE_STATS_MIN_INTERVAL_S is stuck: ``oodguard_queue_stats_up`` 0
QUEUE_STATS_STUCK_INTERVALS = 3
#: ``request_refused`` reasons (admission control answered RESOURCE_EXHAUSTED); anything else counts as "other"
REFUSED_REASONS = ("inflight_requests", "inflight_items", "inflight_bytes", "decode_queue", "other")
#: ``bad_request`` reasons; anything else counts as "other"
BAD_REQUEST_REASONS = ("undecodable", "too_many_fields", "request_id_too_long", "metadata_too_large", "image_too_large",
                       "image_format", "image_structure", "reply_too_large", "other")
#: the metrics endpoint: seconds a connection gets for its TLS handshake and for each read or write
HTTP_TIMEOUT_S = 10.0
SCORE_HELP = ("OOD score values; buckets from the version's calibration (calibration quantiles, the threshold, steps "
              "above the largest calibration score)")
SERVING_HELP = "1 when the gateway's gRPC health is SERVING"
INFLIGHT_HELP = "Predict calls admitted and not answered yet (admission control refuses above --max-inflight-requests)"
SPOOL_HELP = "Records waiting in the local spool for the queue store"
REACHABLE_HELP = "1 unless the query queue's store is known to be unreachable (its last call failed)"
#: multiprocess mode: the hidden gauge holding score bucket counts (label ``le``; ``le="sum"``: the sum)
SCORE_PARTS = "oodguard_score_parts"
#: multiprocess mode: how often each worker writes its per-worker state and folded scores to the files, seconds
SYNC_INTERVAL_S = 1.0


def score_buckets(threshold: "ScoreThreshold") -> tuple[float, ...]:
    """Histogram boundaries of one score, derived from its calibration (ascending, ending with +Inf):
    quantiles of the calibration scores, the threshold, the largest calibration score and steps above it."""
    calib = np.asarray(threshold.sorted_scores, dtype=np.float64)
    points = [float(threshold.threshold)]
    if calib.size:
        points += [float(v) for v in np.quantile(calib, SCORE_QUANTILES)]
        top = float(calib[-1])
        lo, hi = (float(v) for v in np.quantile(calib, (0.05, 0.95)))
        spread = hi - lo
        if not spread > 0:
            spread = max(abs(top), 1.0) * 1e-3
        points.append(top)
        points += [top + step * spread for step in SCORE_TAIL_STEPS]
    bounds = sorted({p for p in points if np.isfinite(p)})  # exact: the threshold bucket is "score <= threshold"
    return tuple(bounds) + (float("inf"),)


def expected_flag_rates(served: "ServedVersion", policy: "DecisionPolicy") -> tuple[float, float]:
    """(p0, upper bound of p0): the share of in-distribution items the policy flags, from the calibration."""
    point, upper = [], []
    for name in policy.scores:
        t = served.calibration.thresholds[name]
        point.append((t.n + 1 - t.accepted) / (t.n + 1))
        upper.append(1.0 - float(t.achieved_tpr_ci95[0]))
    if policy.mode == "any":
        return min(1.0, sum(point)), min(1.0, sum(upper))
    return min(point), min(upper)
