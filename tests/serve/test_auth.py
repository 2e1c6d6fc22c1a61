"""Transport security of the gateway: TLS, mutual TLS and bearer-token auth, with certificates made at test
time; and client metadata stored as data only (odd strings round-trip, never become paths)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from oodguard.serve.settings import Settings, SettingsError
from oodguard.queues.sqlite import SQLiteQueue
from oodguard.serve.v1 import oodguard_pb2 as pb
from oodguard.serve.v1 import oodguard_pb2_grpc as pb_grpc

from .test_server import noise, tensor

x509 = pytest.importorskip("cryptography.x509", reason="the cryptography package (dev extra) makes the test certificates")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

TOKEN = "s3cr3t-token-for-tests"


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _cert(subject: str, key, issuer_name, issuer_key, ca: bool = False, server: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


class PKI:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM files."""

    def __init__(self, folder: Path, name: str):
        folder.mkdir(parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
        ca = _cert(f"{name} test CA", ca_key, ca_name, ca_key, ca=True)
        server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        server = _cert("localhost", server_key, ca_name, ca_key, server=True)
        client = _cert(f"{name} client", client_key, ca_name, ca_key)
        self.ca_pem = ca.public_bytes(serialization.Encoding.PEM)
        self.client_cert_pem = client.public_bytes(serialization.Encoding.PEM)
        self.client_key_pem = _pem_key(client_key)
        self.ca_path = folder / "ca.pem"
        self.cert_path = folder / "server.pem"
        self.key_path = folder / "server.key"
        self.ca_path.write_bytes(self.ca_pem)
        self.cert_path.write_bytes(server.public_bytes(serialization.Encoding.PEM))
        self.key_path.write_bytes(_pem_key(server_key))

    def channel(self, target: str, client_cert: bool = False, other: "PKI | None" = None) -> grpc.Channel:
        source = other or self
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=source.client_key_pem if client_cert else None,
            certificate_chain=source.client_cert_pem if client_cert else None)
        return grpc.secure_channel(target, creds)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"), "oodguard")


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki-other"), "stranger")


def predict(channel: grpc.Channel, metadata=None, timeout: float = 10) -> pb.PredictResponse:
    return pb_grpc.OODGuardStub(channel).Predict(pb.PredictRequest(tensor=tensor(noise(1))), metadata=metadata,
                                                 timeout=timeout)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_tls_only(start_gateway, repo_copy, pki):
    gw = start_gateway(repo_copy, tls_cert=pki.cert_path, tls_key=pki.key_path)
    with pki.channel(gw.target) as channel:
        assert predict(channel).version == 1
    with grpc.insecure_channel(gw.target) as channel:  # a plain-TCP client cannot talk to a TLS gateway
        assert code_of(lambda: predict(channel, timeout=3)) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_the_ca(start_gateway, repo_copy, pki, other_pki):
    gw = start_gateway(repo_copy, tls_cert=pki.cert_path, tls_key=pki.key_path, tls_client_ca=pki.ca_path)
    with pki.channel(gw.target, client_cert=True) as channel:
        assert predict(channel).version == 1
    with pki.channel(gw.target) as channel:  # TLS without a client certificate
        assert code_of(lambda: predict(channel, timeout=3)) == grpc.StatusCode.UNAVAILABLE
    with pki.channel(gw.target, client_cert=True, other=other_pki) as channel:  # certificate of another CA
        assert code_of(lambda: predict(channel, timeout=3)) == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(gw.target) as channel:
        assert code_of(lambda: predict(channel, timeout=3)) == grpc.StatusCode.UNAVAILABLE


def test_bearer_token_over_tls(start_gateway, repo_copy, pki, tmp_path, monkeypatch):
    import oodguard.serve.auth as auth

    compared = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    gw = start_gateway(repo_copy, tls_cert=pki.cert_path, tls_key=pki.key_path, auth_token_file=token_file)
    with pki.channel(gw.target) as channel:
        assert predict(channel, metadata=[("authorization", f"Bearer {TOKEN}")]).version == 1
        assert compared, "the token is compared with hmac.compare_digest"
        assert predict(channel, metadata=[("authorization", f"bearer {TOKEN}")]).version == 1  # scheme is case-insensitive
        for bad in ([], [("authorization", "Bearer wrong")], [("authorization", f"Basic {TOKEN}")],
                    [("authorization", TOKEN)], [("authorization", f"Bearer {TOKEN}x")]):
            assert code_of(lambda: predict(channel, metadata=bad)) == grpc.StatusCode.UNAUTHENTICATED, bad
        info = pb_grpc.OODGuardStub(channel).ModelInfo
        assert code_of(lambda: info(pb.ModelInfoRequest(), timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
        assert info(pb.ModelInfoRequest(), metadata=[("authorization", f"Bearer {TOKEN}")], timeout=10).models
        # health checks stay open (load balancers probe without the secret)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    failures = gw.gateway.metrics.auth_failures
    assert failures.labels("missing")._value.get() == 2 and failures.labels("invalid")._value.get() == 4


def test_bearer_token_without_tls(start_gateway, repo_copy):
    gw = start_gateway(repo_copy, auth_token=TOKEN)
    with grpc.insecure_channel(gw.target) as channel:
        assert predict(channel, metadata=[("authorization", f"Bearer {TOKEN}")]).version == 1
        assert code_of(lambda: predict(channel)) == grpc.StatusCode.UNAUTHENTICATED


def test_security_settings_are_validated(tmp_path):
    base = dict(repository=tmp_path)
    with pytest.raises(SettingsError, match="tls_key"):
        Settings(**base, tls_cert=tmp_path / "c.pem")
    with pytest.raises(SettingsError, match="tls_cert"):
        Settings(**base, tls_key=tmp_path / "k.pem")
    with pytest.raises(SettingsError, match="tls_client_ca"):
        Settings(**base, tls_client_ca=tmp_path / "ca.pem")
    with pytest.raises(SettingsError, match="auth_token"):
        Settings(**base, auth_token="a", auth_token_file=tmp_path / "t")
    with pytest.raises(SettingsError, match="metrics_port"):
        Settings(**base, metrics_port=70000)
    s = Settings.from_sources({"repository": str(tmp_path), "tls_cert": "c.pem", "tls_key": "k.pem",
                               "metrics_port": "9464"}, env={"OODGUARD_AUTH_TOKEN": TOKEN})
    assert s.tls_cert == Path("c.pem") and s.metrics_port == 9464 and s.auth_token == TOKEN
    assert TOKEN not in repr(s) and TOKEN not in s.describe()


def test_missing_certificate_file_stops_the_start(start_gateway, repo_copy, tmp_path):
    with pytest.raises(OSError, match="tls_cert"):
        start_gateway(repo_copy, tls_cert=tmp_path / "none.pem", tls_key=tmp_path / "none.key")


ODD_METADATA = {
    "../../../../etc/passwd": "../../../tmp/evil",
    "/abs/path": "C:\\Windows\\System32",
    "quote'); DROP TABLE records; --": "\"; DELETE FROM records WHERE 1=1; --",
    "new\nline": "carriage\r\nreturn\ttab",
    "nul": "a\x00b",
    "unicode ☃": "ünïcødé 🎉",
    "": "empty key",
}


def test_client_metadata_is_stored_as_data_only(start_gateway, repo_copy, tmp_path):
    queue_path = tmp_path / "queue-odd.sqlite"
    gw = start_gateway(repo_copy, queue_path=queue_path)
    before = sorted(p for p in tmp_path.rglob("*") if "repo" not in p.parts)
    with grpc.insecure_channel(gw.target) as channel:
        response = pb_grpc.OODGuardStub(channel).Predict(
            pb.PredictRequest(tensor=tensor(noise(2)), request_id="../../x'; --\n", metadata=ODD_METADATA), timeout=10)
    ids = [p.queue_record_id for p in response.predictions if p.queue_record_id]
    assert ids
    records = gw.gateway.queue.get(ids)
    assert [r.metadata for r in records] == [ODD_METADATA] * len(ids)
    assert all(r.request_id == "../../x'; --\n" for r in records)
    # nothing was created outside the queue's own files, and the odd names exist nowhere as paths
    after = sorted(p for p in tmp_path.rglob("*") if "repo" not in p.parts)
    assert {p.name for p in set(after) - set(before)} <= {"queue-odd.sqlite", "queue-odd.sqlite-wal",
                                                         "queue-odd.sqlite-shm"}
    assert not Path("/tmp/evil").exists() and not (tmp_path / "etc").exists()
    # the table survived the SQL-looking strings, and a second reader sees the same data
    reader = SQLiteQueue(queue_path)
    try:
        assert reader.stats().size == len(ids)
        assert [r.metadata for r in reader.get(ids)] == [ODD_METADATA] * len(ids)
    finally:
        reader.close()


def test_redis_queue_stores_odd_metadata_as_data(redis_server, tmp_path):
    from oodguard.queues.redis_streams import RedisQueue

    from queues.store_checks import record

    q = RedisQueue(redis_server.url, tmp_path / "spool", connect_retry_s=0.1)
    try:
        rec = record(0)
        rec.metadata = dict(ODD_METADATA)
        rec.request_id = "../../x'; --\n"
        ids = q.put([rec])
        got = q.get(ids)[0]
        assert got.metadata == ODD_METADATA and got.request_id == rec.request_id
    finally:
        q.close()
    assert {p.name for p in tmp_path.iterdir()} <= {"spool", "redis-data"}  # redis-data: the test server's


@pytest.mark.parametrize("metrics_host, warned", [("0.0.0.0", True), ("127.0.0.1", False)])
def test_open_metrics_beside_an_authenticated_api_are_warned_about(start_gateway, repo_copy, caplog, metrics_host,
                                                                     warned):
    """A token guards the gRPC API, but /metrics (thresholds, flag rates, queue sizes) would answer anyone on the
    network: the start says so, naming the remedies; on loopback only local processes reach it, so no warning."""
    import logging

    from .conftest import free_port

    caplog.set_level(logging.WARNING, logger="oodguard")
    start_gateway(repo_copy, auth_token=TOKEN, metrics_port=free_port(), metrics_host=metrics_host)
    warnings = [r.getMessage() for r in caplog.records if "/metrics on" in r.getMessage()]
    assert len(warnings) == int(warned)
    if warned:
        assert warnings[0].startswith("the gRPC API requires TLS or a token, but /metrics on 0.0.0.0 answers anyone")
        assert "--metrics-auth-file" in warnings[0] and "--metrics-host 127.0.0.1" in warnings[0]
