"""Prometheus metrics of the gateway, served on their own port (``--metrics-port``; 0 = off): plain HTTP, or
HTTPS (``metrics_tls_cert`` / ``metrics_tls_key``), optionally behind HTTP basic auth (``metrics_auth_file``),
on ``metrics_host`` (default: the host of ``--listen``); see :func:`start_metrics_server`.

Every metric lives in the gateway's own :class:`prometheus_client.CollectorRegistry` (several gateways in
one process, as in the tests, do not collide).

With ``oodguard serve --workers N`` (:mod:`oodguard.serve.workers`) every worker runs in prometheus_client's
multiprocess mode (``GatewayMetrics(multiprocess=True)``): the request-path counters and histograms land in
memory-mapped files of one directory per serve start (``PROMETHEUS_MULTIPROC_DIR``), and worker 0 serves one
``/metrics`` that merges every worker's files (:class:`WorkerFiles`, counters of dead workers included) with
its own view of the state (thresholds, model info, queue statistics: the same repository and store for all).
What differs per worker is written to the files too, once a second by :meth:`GatewayMetrics.sync`:
``oodguard_serving`` (the minimum over live workers: 1 only while every worker serves),
``oodguard_inflight_requests`` and ``oodguard_queue_spool_backlog`` (sums over live workers),
``oodguard_queue_reachable`` (minimum), and the score histograms (their bucket counts, as hidden gauges that
:class:`WorkerFiles` turns back into ``oodguard_score``). Names, labels and types are those of one process.

Labels are bounded: ``model`` / ``version`` only take values of served versions (a request naming an unknown
model is counted as ``model="unknown"``), ``code`` is a gRPC status name, ``score`` a score the model exports;
request ids and client metadata never become labels.

Traffic (updated on the request path):

- ``oodguard_requests_total{model,version,code}``: Predict calls by gRPC status.
- ``oodguard_request_duration_seconds{model}``: Predict latency, end to end (histogram).
- ``oodguard_backend_duration_seconds{model}``: backend inference time of one micro-batch (concurrent requests
  share one call), failed calls included (histogram).
- ``oodguard_backend_errors_total{model,reason}``: failed backend calls (micro-batches) by reason (``unavailable``,
  ``deadline``, ``not_found``).
- ``oodguard_items_total{model,version}``: items decided (a request holds one or more items).
- ``oodguard_flagged_items_total{model,version}``: items flagged OOD (the flagged rate is this over ``items``),
  for any reason: the policy's thresholds, or failing closed (the two counters below).
- ``oodguard_unscorable_items_total{model,version}``: items flagged because a score is not finite.
- ``oodguard_input_out_of_range_items_total{model,version}``: items flagged because the input lies outside the
  model's input range.
- ``oodguard_flagged_total{model,version,score}``: flagged items per deciding score that crossed its
  threshold (an item crossed by two deciding scores counts once for each).
- ``oodguard_score{model,version,score}``: every score's value (histogram). Its buckets come from that
  version's calibration: quantiles of the in-distribution calibration scores, the threshold itself and
  points beyond the largest calibration score, so in-distribution traffic fills each bucket with a known
  share and a shift shows as a change of the bucket shares. (Series with a negative bound have no
  ``_count`` / ``_sum``, as OpenMetrics requires: their ``le="+Inf"`` bucket is the count.)
- ``oodguard_queue_write_duration_seconds{model}``: time of one queue write (histogram).
- ``oodguard_queue_write_failures_total{model}``: queue writes that failed (the request got UNAVAILABLE).
- ``oodguard_queue_rejected_items_total{model}``: items refused by a full queue (policy ``reject``).
- ``oodguard_auth_failures_total{reason}``: calls refused with UNAUTHENTICATED (``missing``, ``invalid``).
- ``oodguard_refused_requests_total{reason}``: calls refused with RESOURCE_EXHAUSTED by admission control
  (:data:`REFUSED_REASONS`).
- ``oodguard_bad_requests_total{reason}``: calls refused as malformed or over a size limit
  (:data:`BAD_REQUEST_REASONS`).

State (read when scraped):

- ``oodguard_threshold{model,version,score,deciding}``: every score's calibrated threshold.
- ``oodguard_calibrated_flag_rate{model,version}``: p0, the share of in-distribution traffic the decision
  policy flags by design (conformal: ``(n + 1 - accepted) / (n + 1)`` per score, about 5% at 95% TPR;
  several deciding scores: their sum for mode ``any`` (an upper bound), the smallest for ``all``).
- ``oodguard_calibrated_flag_rate_upper{model,version}``: the same from the upper end of each threshold's
  95% Clopper-Pearson TPR interval: the rate the alert compares with (it allows for the calibration set's
  own sampling error).
- ``oodguard_model_info{model,version,latest,backend}`` = 1 per served version.
- ``oodguard_serving``: 1 when gRPC health is SERVING.
- ``oodguard_queue_spool_backlog`` and ``oodguard_queue_reachable`` (1/0): from the queue's own memory
  (:meth:`QueryQueue.local_state`), on every scrape, also while the queue's store is down.
- ``oodguard_queue_size`` (unharvested), ``oodguard_queue_pending``, ``oodguard_queue_max_size``,
  ``oodguard_queue_bytes``, ``oodguard_queue_max_bytes``, ``oodguard_queue_accepted_total``,
  ``oodguard_queue_rejected_total``, ``oodguard_queue_evicted_total`` (the queue's own counters, which survive
  restarts): the store's statistics, read by a thread of their own while the endpoint runs (a scrape never
  waits on the store); ``oodguard_queue_stats_up`` is 0, and these are left out, when the last read failed
  or the current one is stuck (running for :data:`QUEUE_STATS_STUCK_INTERVALS` intervals: a hung store).
"""

from .definitions import (BAD_REQUEST_REASONS, LATENCY_BUCKETS, REFUSED_REASONS, SYNC_INTERVAL_S, expected_flag_rates,
                          score_buckets)
from .gateway import GatewayMetrics
from .http import basic_auth, load_basic_auth, start_metrics_server

__all__ = ["GatewayMetrics", "start_metrics_server", "basic_auth", "load_basic_auth", "score_buckets",
           "expected_flag_rates", "LATENCY_BUCKETS", "REFUSED_REASONS", "BAD_REQUEST_REASONS", "SYNC_INTERVAL_S"]
