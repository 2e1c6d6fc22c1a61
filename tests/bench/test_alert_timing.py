"""bench/alert_timing.py's promtool part (no gateway): a deterministic traffic shift against the real rules.yml
pages when the expected counts say it should, and steady in-distribution traffic never pages."""

import shutil

import numpy as np
import pytest

from bench_scripts import load_bench


def alert_timing():
    return load_bench("alert_timing")


def test_parse_duration_and_episodes():
    bench = alert_timing()
    assert bench.parse_duration("1h5m") == 65
    assert bench.parse_duration("2h0m0s") == 120
    assert bench.parse_duration("45m") == 45
    assert bench.episodes([5, 10, 15, 40, 45], 5) == [(5, 15), (40, 45)]


@pytest.fixture
def promtool():
    from missing import missing

    if shutil.which("promtool") is None:
        missing("promtool is not installed; run `bash scripts/setup_prometheus.sh`", "OODGUARD_REQUIRE_PROMTOOL")


def test_promtool_firing_matches_the_expected_time_to_page(tmp_path, promtool):
    """Deterministic counts (60 items/min, 1 request/s): the page fires when the expected counts say it should,
    within the 5-minute target at 20% OOD; steady in-distribution traffic never pages nor tickets."""
    bench = alert_timing()
    rate, p0, p0u, share_id, share_mix = 60, 0.05, 0.055, 0.05, 0.24
    minutes = 160
    items = np.full(minutes, rate)
    flagged = np.where(np.arange(minutes) < 120, round(rate * share_id), round(rate * share_mix))
    firing, _ = bench.promtool_firing(tmp_path, "shift", items, flagged, p0, p0u, list(range(1, minutes + 1)))
    expected = bench.expected_minutes_to_page(rate, round(rate * share_id) / rate, round(rate * share_mix) / rate, p0,
                                              p0u)
    assert firing[bench.PAGE] and min(firing[bench.PAGE]) > 120
    assert abs(bench.first_after(firing[bench.PAGE], 120) - expected) <= 1 and expected <= 5
    steady = np.full(minutes, round(rate * share_id))
    quiet, _ = bench.promtool_firing(tmp_path, "quiet", items, steady, p0, p0u, list(range(5, minutes + 1, 5)))
    assert quiet == {bench.PAGE: [], bench.TICKET: []}


def test_the_false_page_bound_falls_with_the_share_and_vanishes_under_the_minimum_count():
    bench = alert_timing()
    assert bench.false_page_bound(60, 0.05, 0.05, 0.055) < 1e-4 < 1e-2 < bench.false_page_bound(60, 0.09, 0.05, 0.055)
    assert bench.false_page_bound(5, 0.5, 0.05, 0.055) == 0.0  # 75 items per 15 minutes: under the minimum of 100
