from pathlib import Path

import pytest

from oodguard.serve.settings import Settings, SettingsError


def test_defaults_env_and_flags_layer():
    env = {"OODGUARD_REPOSITORY": "/models", "OODGUARD_DECISION_SCORES": "sisome, energy",
           "OODGUARD_DECISION_MODE": "all", "OODGUARD_MAX_WAIT_MS": "5", "OODGUARD_QUEUE_MAX_SIZE": "10",
           "OODGUARD_SAMPLE_SEED": "7", "OODGUARD_LISTEN": "0.0.0.0:9000", "UNRELATED": "x"}
    s = Settings.from_sources({"listen": "127.0.0.1:1234", "queue_max_size": None, "max_wait_ms": "8"}, env)
    assert s.repository == Path("/models")
    assert s.decision_scores == ("sisome", "energy") and s.decision_mode == "all"
    assert s.listen == "127.0.0.1:1234"  # flag beats env
    assert s.max_wait_ms == 8.0 and s.queue_max_size == 10 and s.sample_seed == 7
    assert s.backend == "embedded" and s.unflagged_sample_fraction == 0.0 and s.queue_full_policy == "reject"
    assert s.triton_inflight_batches == 1
    assert s.queue_idempotency_window_s == 600.0
    assert Settings.from_sources({"queue_idempotency_window_s": "0"}, env).queue_idempotency_window_s == 0.0
    assert (s.max_image_pixels, s.max_inflight_requests, s.input_range_margin) == (4096 * 4096, 256, 0.5)
    assert Settings.from_sources({}, {**env, "OODGUARD_INPUT_RANGE_MARGIN": "inf"}).input_range_margin == float("inf")
    with pytest.raises(Exception):
        s.listen = "x"  # frozen


def test_the_decision_defaults_to_fused_with_a_sisome_fallback_only_by_default():
    default = Settings.from_sources({}, {"OODGUARD_REPOSITORY": "r"})
    assert default.decision_scores == ("fused",) and default.effective_decision_fallback == ("sisome",)
    chosen = Settings.from_sources({"decision_scores": "sisome,odin"}, {"OODGUARD_REPOSITORY": "r"})
    assert chosen.effective_decision_fallback == ()  # a misspelt score must refuse, not fall back quietly
    both = Settings.from_sources({"decision_scores": "energy", "decision_fallback": "msp"}, {"OODGUARD_REPOSITORY": "r"})
    assert both.effective_decision_fallback == ("msp",)
    off = Settings.from_sources({}, {"OODGUARD_REPOSITORY": "r", "OODGUARD_DECISION_FALLBACK": "none"})
    assert off.decision_fallback == () and off.effective_decision_fallback == ()


@pytest.mark.parametrize("env, message", [
    ({}, "give --repository"),
    ({"OODGUARD_REPOSITORY": "r", "OODGUARD_BACKEND": "tensorflow"}, "OODGUARD_BACKEND"),
    ({"OODGUARD_REPOSITORY": "r", "OODGUARD_LISTEN": "nowhere"}, "HOST:PORT"),
    ({"OODGUARD_REPOSITORY": "r", "OODGUARD_QUEUE_FULL_POLICY": "drop"}, "evict-oldest"),
    ({"OODGUARD_REPOSITORY": "r", "OODGUARD_UNFLAGGED_SAMPLE_FRACTION": "1.5"}, "within"),
    ({"OODGUARD_REPOSITORY": "r", "OODGUARD_MAX_BATCH": "many"}, "cannot read 'many' as int"),
    ({"OODGUARD_REPOSITORY": "r", "OODGUARD_DECISION_SCORES": ","}, "name at least one score"),
    ({"OODGUARD_REPOSITORY": "r", "OODGUARD_DECISION_MODE": "most"}, "'any' or 'all'"),
    ({"OODGUARD_REPOSITORY": "r", "OODGUARD_TRITON_INFLIGHT_BATCHES": "0"}, "OODGUARD_TRITON_INFLIGHT_BATCHES.*1..64"),
    ({"OODGUARD_REPOSITORY": "r", "OODGUARD_MAX_INFLIGHT_REQUESTS": "0"}, "OODGUARD_MAX_INFLIGHT_REQUESTS.*>= 1"),
    ({"OODGUARD_REPOSITORY": "r", "OODGUARD_MAX_IMAGE_PIXELS": "100", "OODGUARD_MAX_REQUEST_PIXELS": "99"},
     "max_request_pixels.*>= max_image_pixels"),
    ({"OODGUARD_REPOSITORY": "r", "OODGUARD_INPUT_RANGE_MARGIN": "-1"}, "OODGUARD_INPUT_RANGE_MARGIN.*inf = no check"),
    ({"OODGUARD_REPOSITORY": "r", "OODGUARD_INPUT_RANGE_MARGIN": "nan"}, "OODGUARD_INPUT_RANGE_MARGIN"),
    ({"OODGUARD_REPOSITORY": "r", "OODGUARD_QUEUE_MAX_BYTES": "10"}, "OODGUARD_QUEUE_MAX_BYTES.*at least 1024"),
    ({"OODGUARD_REPOSITORY": "r", "OODGUARD_MAX_METADATA_BYTES": "-1"}, "OODGUARD_MAX_METADATA_BYTES"),
    ({"OODGUARD_REPOSITORY": "r", "OODGUARD_METRICS_TLS_CERT": "c.pem"}, "give both metrics_tls_cert and metrics_tls_key"),
    ({"OODGUARD_REPOSITORY": "r", "OODGUARD_QUEUE_IDEMPOTENCY_WINDOW_S": "-1"}, "OODGUARD_QUEUE_IDEMPOTENCY_WINDOW_S.*0 = off"),
    ({"OODGUARD_REPOSITORY": "r", "OODGUARD_QUEUE_IDEMPOTENCY_WINDOW_S": "inf"}, "OODGUARD_QUEUE_IDEMPOTENCY_WINDOW_S"),
])
def test_bad_settings_say_which(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_sources({}, env)


def test_every_serve_flag_is_generated_from_its_setting_with_default_and_variable():
    """One source: each Settings field gives its flag's name, metavar, help, default and environment variable."""
    import dataclasses

    from oodguard.serve.settings import serve_flags

    flags = {flag: (metavar, text) for flag, metavar, text in serve_flags()}
    fields = dataclasses.fields(Settings)
    assert list(flags) == ["--" + f.name.replace("_", "-") for f in fields]
    for f in fields:
        metavar, text = flags["--" + f.name.replace("_", "-")]
        assert metavar and text.endswith(f"env OODGUARD_{f.name.upper()})"), text
        assert ("(required;" in text) == (f.default is dataclasses.MISSING), text
    assert "(default 1073741824 = 1 GiB; env OODGUARD_QUEUE_MAX_BYTES)" in flags["--queue-max-bytes"][1]
    assert "(default 600; 0: off; env" in flags["--queue-idempotency-window-s"][1]
    assert "(default: the --listen host; env" in flags["--metrics-host"][1]
    assert "(default fused: the calibrated p-value fusion" in flags["--decision-scores"][1]


def test_the_configuration_page_names_every_serve_flag():
    from oodguard.serve.settings import serve_flags

    page = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    assert [flag for flag, _, _ in serve_flags() if flag not in page] == []
