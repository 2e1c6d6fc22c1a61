"""``oodguard serve --workers N``: one ``/metrics`` merged from every worker's memory-mapped files, the score
histograms rebuilt from the hidden bucket gauges each worker writes."""

from __future__ import annotations

import numpy as np
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from .definitions import SCORE_HELP, SCORE_PARTS


class WorkerFiles(Collector):
    """Multiprocess mode: what every worker wrote to ``path`` (prometheus_client's :class:`MultiProcessCollector`:
    counters and histograms summed over all workers, dead ones included; gauges by their ``multiprocess_mode``),
    with the hidden score bucket gauges turned back into the ``oodguard_score`` histograms."""

    def __init__(self, path: str) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self._files = MultiProcessCollector(None, path)

    def collect(self):
        parts: dict[tuple[str, str, str], dict[str, float]] = {}
        for family in self._files.collect():
            if family.name != SCORE_PARTS:
                yield family
                continue
            for sample in family.samples:
                labels = sample.labels
                parts.setdefault((labels["model"], labels["version"], labels["score"]), {})[labels["le"]] = sample.value
        scores = HistogramMetricFamily("oodguard_score", SCORE_HELP, labels=["model", "version", "score"])
        for key in sorted(parts):
            counts = parts[key]
            total = counts.pop("sum", 0.0)
            bounds = sorted(counts, key=float)
            cumulative = np.cumsum([counts[b] for b in bounds])
            scores.add_metric(list(key), [(b, float(c)) for b, c in zip(bounds, cumulative)], total)
        yield scores
