"""The ``/metrics`` endpoint: its bind address, HTTP basic auth (and a bad auth file stopping the start), and
HTTPS."""

from __future__ import annotations

import base64
import socket
import ssl
import time
import urllib.error

import pytest

from .metrics_helpers import StubQueue, bound_metrics, get, parse, value


PASSWORD = "pa:ss wörd"  # a colon and non-ASCII: basic auth splits at the first colon, UTF-8


@pytest.fixture
def auth_file(tmp_path):
    path = tmp_path / "metrics-auth"
    path.write_text(f"prometheus:{PASSWORD}\n", encoding="utf-8")
    return path


def test_basic_auth(serve_metrics, auth_file):
    metrics = bound_metrics(StubQueue())
    url = f"http://127.0.0.1:{serve_metrics(metrics, auth_file=auth_file)}/metrics"
    for auth in (None, "prometheus:wrong", "prometheus:" + PASSWORD[:-1], "other:" + PASSWORD, "prometheus"):
        status, headers, body = get(url, auth=auth)
        assert status == 401 and b"oodguard" not in body
        assert headers["WWW-Authenticate"].startswith('Basic realm="oodguard metrics"')
    for authorization in ("Bearer " + base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode(), "Basic !!!",
                          "Basic"):
        assert get(url, authorization=authorization)[0] == 401
    status, _, body = get(url, auth=f"prometheus:{PASSWORD}")
    assert status == 200 and value(parse(body.decode()), "oodguard_queue_spool_backlog") == 7
    assert get(url, authorization="basic " + base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode())[0] == 200


def test_https_with_basic_auth(serve_metrics, auth_file, tmp_path):
    from .test_auth import PKI  # skips without the cryptography package

    pki = PKI(tmp_path / "pki", "metrics")
    port = serve_metrics(bound_metrics(StubQueue()), tls_cert=pki.cert_path, tls_key=pki.key_path, auth_file=auth_file)
    url = f"https://127.0.0.1:{port}/metrics"
    trusted = ssl.create_default_context(cafile=str(pki.ca_path))
    # a client that connects and never speaks TLS does not hold up other scrapes
    with socket.create_connection(("127.0.0.1", port)):
        started = time.perf_counter()
        status, _, body = get(url, auth=f"prometheus:{PASSWORD}", context=trusted)
        assert time.perf_counter() - started < 1.0
    assert status == 200 and value(parse(body.decode()), "oodguard_queue_reachable") == 0
    assert get(url, context=trusted)[0] == 401
    with pytest.raises(urllib.error.URLError) as info:  # the certificate is checked: a client without the CA
        get(url, auth=f"prometheus:{PASSWORD}", context=ssl.create_default_context())
    assert isinstance(info.value.reason, ssl.SSLCertVerificationError)
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # no plain HTTP on the TLS port
        get(f"http://127.0.0.1:{port}/metrics", auth=f"prometheus:{PASSWORD}")


def test_the_endpoint_binds_the_given_host(serve_metrics):
    port = serve_metrics(bound_metrics(StubQueue()), host="127.0.0.2")
    assert get(f"http://127.0.0.2:{port}/metrics")[0] == 200
    with pytest.raises(urllib.error.URLError) as info:  # not on another loopback address
        get(f"http://127.0.0.1:{port}/metrics")
    assert isinstance(info.value.reason, ConnectionRefusedError)


@pytest.mark.parametrize("content", ["", "no-colon\n", ":password\n", "user:\n", "a:b\nc:d\n"])
def test_a_bad_auth_file_stops_the_start(tmp_path, content):
    path = tmp_path / "auth"
    path.write_text(content)
    metrics = bound_metrics(StubQueue())
    with pytest.raises(ValueError, match="user:password"):
        metrics.start_server(0, "127.0.0.1", auth_file=path)
    assert metrics._server is None and metrics._state.stats._thread is None
