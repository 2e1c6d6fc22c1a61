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
    ({"OODGUARD_REPOSITORY": "r", "OODGUARD_BACKEND": "triton", "OODGUARD_TRITON_URL": ""},
     "triton_url .*needs a Triton gRPC address"),
    ({"OODGUARD_REPOSITORY": "r", "OODGUARD_AUTH_TOKEN": "a", "OODGUARD_AUTH_TOKEN_FILE": "f"}, "not both"),
])
def test_bad_settings_say_which(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_sources({}, env)


@pytest.mark.parametrize("values, message", [
    ({"listen": "h:99999"}, "listen (OODGUARD_LISTEN): expected HOST:PORT, got 'h:99999'"),
    ({"workers": 257}, "workers (OODGUARD_WORKERS): must be within 0..256 (0 or 'auto': one per core), got 257"),
    ({"backend": "tf"}, "backend (OODGUARD_BACKEND): expected one of embedded, triton, got 'tf'"),
    ({"decision_mode": "most"}, "decision_mode (OODGUARD_DECISION_MODE): expected 'any' or 'all', got 'most'"),
    ({"queue_full_policy": "drop"}, "queue_full_policy (OODGUARD_QUEUE_FULL_POLICY): expected 'reject' or "
                                    "'evict-oldest', got 'drop'"),
    ({"decision_scores": ("a", "a")}, "decision_scores (OODGUARD_DECISION_SCORES): repeated score in ['a', 'a']"),
    ({"decision_fallback": ("b", "b")}, "decision_fallback (OODGUARD_DECISION_FALLBACK): empty or repeated score in "
                                        "['b', 'b']"),
    ({"max_wait_ms": 10001.0}, "max_wait_ms (OODGUARD_MAX_WAIT_MS): must be within 0..10000 ms, got 10001.0"),
    ({"max_batch": -1}, "max_batch (OODGUARD_MAX_BATCH): must be >= 0 (0 = the model's max batch size), got -1"),
    ({"queue_url": "http://x"}, "queue_url (OODGUARD_QUEUE_URL): expected sqlite:///PATH (relative to the working "
                                "directory), sqlite:////ABSOLUTE/PATH or redis://HOST:PORT/DB, got 'http://x'"),
    ({"queue_url": "sqlite://"}, "queue_url (OODGUARD_QUEUE_URL): queue URL 'sqlite://' names no file"),
    ({"queue_max_size": 0}, "queue_max_size (OODGUARD_QUEUE_MAX_SIZE): must be >= 1, got 0"),
    ({"max_message_bytes": 1023}, "max_message_bytes (OODGUARD_MAX_MESSAGE_BYTES): must be at least 1024, got 1023"),
    ({"unflagged_sample_fraction": float("nan")},
     "unflagged_sample_fraction (OODGUARD_UNFLAGGED_SAMPLE_FRACTION): must be within [0, 1], got nan"),
    ({"poll_interval_s": 0.0}, "poll_interval_s (OODGUARD_POLL_INTERVAL_S): must be > 0, got 0.0"),
    ({"poll_interval_s": float("nan")}, "poll_interval_s (OODGUARD_POLL_INTERVAL_S): must be > 0, got nan"),
    ({"drain_timeout_s": -1.0}, "drain_timeout_s (OODGUARD_DRAIN_TIMEOUT_S): must be >= 0, got -1.0"),
    ({"metrics_port": 65536}, "metrics_port (OODGUARD_METRICS_PORT): must be within 0..65535 (0 = off), got 65536"),
    ({"auth_token": "x\n"}, "auth_token (OODGUARD_AUTH_TOKEN): must not hold whitespace at either end or line breaks"),
    ({"tls_key": Path("k.pem")}, "tls_cert (OODGUARD_TLS_CERT): give both tls_cert and tls_key (or neither)"),
    ({"tls_client_ca": Path("ca.pem")},
     "tls_client_ca (OODGUARD_TLS_CLIENT_CA): mutual TLS needs tls_cert and tls_key"),
    ({"max_image_pixels": 100, "max_request_pixels": 99},
     "max_request_pixels (OODGUARD_MAX_REQUEST_PIXELS): must be >= max_image_pixels (100), got 99"),
])
def test_each_setting_is_checked_by_its_own_validator_and_named_in_the_message(values, message):
    with pytest.raises(SettingsError) as refused:
        Settings(repository=Path("r"), **values)
    assert str(refused.value).startswith(message)


def test_every_numeric_setting_declares_a_check_or_why_it_has_none():
    """A number without bounds is a setting nobody thought through: each int/float setting names its constraint
    (``check=``) or the reason it needs none (``unchecked=``), and every check passes the default."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(Settings)
    numeric = [f for f in dataclasses.fields(Settings)
               if isinstance(f.default, (int, float)) or {int, float} & set(typing.get_args(hints[f.name]) or
                                                                            [hints[f.name]])]
    assert len(numeric) >= 20 and "sample_seed" in [f.name for f in numeric]
    unchecked = [f.name for f in numeric if f.metadata["check"] is None and not f.metadata["unchecked"]]
    assert unchecked == [], f"numeric settings with neither a check nor a reason: {unchecked}"
    for f in dataclasses.fields(Settings):
        if f.metadata["check"] is not None and f.default not in (dataclasses.MISSING, None):
            assert f.metadata["check"](f.default) is None, f.name


def test_the_validators_say_what_is_expected():
    from oodguard.serve.setting_checks import at_least, fraction, in_range, one_of, positive

    assert at_least(1)(1) is None and at_least(1)(0) == "must be >= 1, got 0"
    assert at_least(0, "inf = no check")(float("nan")) == "must be >= 0 (inf = no check), got nan"  # NaN is refused
    assert in_range(1, 64)(65) == "must be within 1..64, got 65"
    assert in_range(0, 10, unit="ms")(11) == "must be within 0..10 ms, got 11"
    assert positive(0.0) == "must be > 0, got 0.0" and positive(1e-9) is None
    assert fraction(1.0) is None and fraction(-0.5) == "must be within [0, 1], got -0.5"
    assert one_of(("a", "b", "c"))("d") == "expected 'a', 'b' or 'c', got 'd'"
    assert one_of(lambda: ("x",))("y") == "expected 'x', got 'y'" and one_of(("x",), listed=True)("x") is None


def test_every_serve_flag_is_generated_from_its_setting_with_default_and_variable():
    """One source: each Settings field gives its flag's name, metavar, help, default and environment variable."""
    import dataclasses

    from oodguard.serve.setting_flags import serve_flags

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
    from oodguard.serve.setting_flags import serve_flags

    page = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    assert [flag for flag, _, _ in serve_flags() if flag not in page] == []
