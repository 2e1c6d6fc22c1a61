"""Smoke test of bench/alert_timing.py's promtool part (no gateway): a deterministic traffic shift against the real
rules.yml fires when the rule's bound and `for: 10m` say it should, and steady in-distribution traffic never pages."""

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench():
    spec = importlib.util.spec_from_file_location("alert_timing", BENCH / "alert_timing.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["alert_timing"] = module
    spec.loader.exec_module(module)
    return module


def test_parse_duration_and_episodes():
    bench = load_bench()
    assert bench.parse_duration("1h5m") == 65
    assert bench.parse_duration("2h0m0s") == 120
    assert bench.parse_duration("45m") == 45
    assert bench.episodes([5, 10, 15, 40, 45], 5) == [(5, 15), (40, 45)]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (scripts/setup_prometheus.sh)")
def test_promtool_firing_matches_the_analytic_time_to_fire(tmp_path):
    bench = load_bench()
    rate, p0, p0u, share_id, share_ood = 1000, 0.05, 0.08, 0.05, 0.25
    minutes = 200
    items = np.full(minutes, rate)
    flagged = np.where(np.arange(minutes) < 120, int(rate * share_id), int(rate * share_ood))
    firing, _ = bench.promtool_firing(tmp_path, "shift", items, flagged, p0, p0u, list(range(1, minutes + 1)))
    expected = bench.analytic(rate, share_id, share_ood, p0, p0u)["expected_minutes_to_fire"]
    assert firing and min(firing) > 120
    assert abs((min(firing) - 120) - expected) <= 2
    quiet, _ = bench.promtool_firing(tmp_path, "quiet", items, np.full(minutes, int(rate * share_id)), p0, p0u,
                                     list(range(5, minutes + 1, 5)))
    assert quiet == []
