"""bench/hostile_inputs.py: its hand-built inputs, and one end-to-end run (small burst) against real gateway
subprocesses serving the digits demo repository."""

import io
import json

import pytest

from bench_scripts import load_bench

FAILING_CLOSED = ("input_range", "unscorable")


@pytest.fixture(scope="module")
def hi():
    return load_bench("hostile_inputs")


# -- the hand-built inputs (no server) -----------------------------------------------------------
def test_the_bombs_declare_their_sizes_in_few_bytes(hi, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # read the headers without Pillow's own bomb check

    png = hi.png_bomb(13000, 13000)
    assert len(png) < 200_000
    assert Image.open(io.BytesIO(png)).size == (13000, 13000)
    jpeg = hi.jpeg_with_sof(65000, 65000)
    assert len(jpeg) < 1000
    assert Image.open(io.BytesIO(jpeg)).size == (65000, 65000)


def test_hand_encoded_protobuf_fields_parse_like_the_library(hi):
    from oodguard.serve.v1 import oodguard_pb2 as pb

    body = hi.pb_field(5, b"req-1") + hi.varint(4 << 3 | 0) + hi.varint(-1) + hi.pb_field(3, b"digits")
    request = pb.PredictRequest.FromString(body)
    assert (request.request_id, request.version, request.model) == ("req-1", -1, "digits")


def test_help_explains_every_option_with_its_default(hi, capsys):
    with pytest.raises(SystemExit):
        hi.parse_args(["--help"])
    text = capsys.readouterr().out
    for option in ("--repository", "--out", "--burst", "--burst-items", "--bomb-rounds", "--good-requests",
                   "--no-auth-gateway", "--serve-arg", "--work"):
        assert option in text
    assert "default 2000" in text and "default 16" in text


# -- one real run ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(hi, digits_export, tmp_path_factory):
    """One run: burst of 200 requests of 16 images against a gateway admitting 32 calls at once (so the burst
    is partly refused), plus the token-protected second gateway."""
    out = tmp_path_factory.mktemp("hostile-report")
    rc = hi.main(["--repository", str(digits_export[2]), "--out", str(out), "--burst", "200", "--burst-items", "16",
                  "--bomb-rounds", "2", "--vector-rounds", "1", "--quiet-seconds", "1", "--redis-pause-s", "3",
                  "--serve-arg=--max-inflight-requests=32"])
    report = json.loads((out / "report.json").read_text())
    return rc, report, (out / "report.md").read_text()


def test_at_least_40_kinds_each_recorded_with_code_details_and_time(run):
    _, report, _ = run
    kinds = report["kinds"]
    assert len(kinds) >= 40
    assert len({k["kind"] for k in kinds}) == len(kinds)
    for k in kinds:
        assert k["code"] and k["ms"] >= 0
        assert k["details"] or k["code"] == "OK"


def test_every_kind_got_an_allowed_code_and_ok_only_with_every_item_flagged(run):
    _, report, _ = run
    for k in report["kinds"]:
        assert k["code"] in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "OK", "UNAUTHENTICATED"), k
        if k["code"] == "OK" and k["items"] is not None and k["must_flag"]:
            assert k["all_ood"] is True, k


def test_absurd_float_inputs_are_never_answered_in_distribution(run):
    _, report, _ = run
    floats = [k for k in report["kinds"] if k["kind"].startswith("float32 ")]
    assert len(floats) >= 10
    for k in floats:
        assert k["code"] != "OK" or k["all_ood"] is True, k
    answered = {k["kind"]: k for k in floats if k["code"] == "OK"}
    # the NaN/Inf tensors are refused outright; the finite absurd ones answered, flagged by failing closed
    assert answered["float32 constant 3e38"]["reasons"] and set(answered["float32 constant 3e38"]["reasons"]) <= {
        "input_range", "unscorable", "threshold"}
    for name in ("float32 constant 3e38", "float32 constant -3e38", "float32 constant 1e3", "float32 noise x1e4"):
        assert any(r in FAILING_CLOSED for r in answered[name]["reasons"]), answered[name]
    for name in ("float32 NaN", "float32 +Inf", "float32 -Inf"):
        assert next(k for k in floats if k["kind"] == name)["code"] == "INVALID_ARGUMENT"


def test_the_gateway_is_healthy_after_every_kind(run):
    _, report, _ = run
    for k in report["kinds"]:
        assert k["alive_after"] and k["health_after"] == "SERVING" and k["good_after"] == "OK", k
    assert {k["gateway"] for k in report["kinds"]} == {"main", "auth"}
    assert any(k["code"] == "UNAUTHENTICATED" for k in report["kinds"])


def test_good_traffic_never_fails_during_bombs_and_burst(run):
    _, report, _ = run
    assert len(report["bomb_memory"]) == 2
    for phase in report["bomb_memory"]:
        assert phase["good"]["sent"] == 12
        assert phase["good"]["errors"] == 0 and phase["good"]["deadline_misses"] == 0, phase["good"]
        assert phase["bomb_requests"] >= phase["senders"] * phase["min_rounds"]
        assert set(phase["bomb_codes"]) <= {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
        assert phase["memory"]["rss_peak_sampled_mb"] > 0
    burst = report["burst"]
    assert burst["good"]["sent"] >= 5
    assert burst["good"]["errors"] == 0 and burst["good"]["deadline_misses"] == 0, burst["good"]


def test_burst_is_partly_refused_and_the_metrics_count_what_the_client_saw(run):
    _, report, _ = run
    burst = report["burst"]
    assert burst["requests"] == 200 and burst["ok"] + burst["resource_exhausted"] == 200, burst
    assert burst["resource_exhausted"] > 0 and burst["ok"] > 0  # 32 calls admitted at once
    assert burst["seconds_all_refused_answered"] is not None
    check = burst["metrics_check"]
    assert check["equal"], check
    good_attempts = burst["good"]["sent"] + burst["good"]["overloaded_retries"]
    assert sum(check["client_by_code"].values()) == 200 + good_attempts
    assert report["checks"]["metrics equal the client's counts over the burst"]


def test_report_has_a_row_per_kind_and_the_summary(run):
    rc, report, text = run
    assert "| kind | code | details | ms | healthy after |" in text
    table = text.split("| kind | code | details | ms | healthy after |")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == len(report["kinds"])
    assert "bomb memory" in text and "burst" in text and "## Findings" in text
    assert rc == (0 if all(report["checks"].values()) else 1)


def test_the_last_attacks_vectors_are_refused_alone_and_four_at_once_within_their_bounds(run, hi):
    """Each vector of issue 29, by 1 sender and by 4 at once: refused with INVALID_ARGUMENT, the gateway's RSS
    growth within the target, good traffic answered throughout, and all of it in the report's table. (The
    latencies are measured and checked by the benchmark itself, not here: a loaded machine slows every call.)"""
    _, report, text = run
    part = report["attack_vectors"]
    vectors = [v.name for v in hi.attack_vectors()]
    assert [(r["vector"], r["senders"]) for r in part["runs"]] == [(v, n) for v in vectors for n in (1, 4)]
    for r in part["runs"]:
        assert r["codes"] == {"INVALID_ARGUMENT": r["senders"]}, r
        assert r["rss_growth_mb"] < hi.VECTOR_RSS_GROWTH_MB, r
        assert r["good"]["sent"] > 0 and r["good"]["errors"] == 0, r
        assert r["good"]["worst_ms"] >= r["good"]["p50_ms"] > 0, r  # measured, reported in the table
    assert part["quiet"]["sent"] > 10
    assert all(f"| {v} | 4 |" in text for v in vectors)
    kinds = {k["kind"]: k for k in report["kinds"]}
    assert all(kinds[v]["code"] == "INVALID_ARGUMENT" for v in vectors)


def test_a_paused_redis_delays_no_flagged_call_and_loses_no_record(run):
    from missing import missing

    _, report, text = run
    part = report["redis_pause"]
    if "skipped" in part:
        missing(f"the Redis part was skipped: {part['skipped']}", "OODGUARD_REQUIRE_REDIS")
    assert part["calls_during_pause"] > 0 and part["codes"] == {"OK": part["calls"]}
    assert part["worst_during_pause_s"] >= part["p99_during_pause_s"] > 0  # measured; the benchmark checks < 1 s
    assert part["acknowledged_ids"] > 0 and part["lost"] == 0 and part["duplicated"] == 0
    assert "## Redis paused under flagged traffic" in text
