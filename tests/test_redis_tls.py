"""Redis over TLS, as deploy/redis/redis.conf documents it: a real redis-server with `tls-port` and
`tls-auth-clients yes` (certificates made here: a CA, a server certificate, a client certificate), the
shipped ACL users, and a producer that reaches it with nothing but REDIS_URL (`rediss://…` with the CA
and client certificate in its query) and REDIS_PASSWORD_FILE.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from helpers import jpeg
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from test_redis_acl import AclRedis, redis7, render_acl  # noqa: F401  (redis7: a fixture)

from worker.redis_health import mask_url, resolve_url, with_timeouts
from worker.redis_server import RedisServer, free_port


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all from that CA."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("vq-test-ca")).issuer_name(_name("vq-test-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    paths = {"ca": folder / "ca.crt"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, usage, sans in (("server", ExtendedKeyUsageOID.SERVER_AUTH,
                               [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                              ("client", ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName("camera")])):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(f"vq-test-{role}")).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        paths[role] = folder / f"{role}.crt"
        paths[role].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{role}_key"] = folder / f"{role}.key"
        _write_key(key, paths[f"{role}_key"])
    return paths


class TlsRedis(AclRedis):
    def __init__(self, server: RedisServer, secrets_dir: Path, tls_port: int, pki: dict[str, Path]) -> None:
        super().__init__(server, secrets_dir)
        self.tls_port = tls_port
        self.pki = pki

    def url(self, role: str) -> str:
        return (f"rediss://{role}@127.0.0.1:{self.tls_port}/0?ssl_ca_certs={self.pki['ca']}"
                f"&ssl_certfile={self.pki['client']}&ssl_keyfile={self.pki['client_key']}")


@pytest.fixture
def tls_redis(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[TlsRedis]:
    request.getfixturevalue("redis7")  # a redis-server 7+ (the ACL file), imported from test_redis_acl
    pki = make_pki(tmp_path)
    secrets_dir, acl = render_acl(tmp_path)
    tls_port = free_port()
    # The plain port stays on loopback only for RedisServer's readiness probe; clients use the TLS port.
    args = ("--aclfile", str(acl), "--tls-port", str(tls_port), "--tls-cert-file", str(pki["server"]),
            "--tls-key-file", str(pki["server_key"]), "--tls-ca-cert-file", str(pki["ca"]), "--tls-auth-clients", "yes")
    try:
        server = RedisServer(extra_args=args).start()
    except RuntimeError as exc:
        if "tls" in str(exc).lower():
            pytest.skip(f"this redis-server has no TLS: {exc}")
        raise
    try:
        yield TlsRedis(server, secrets_dir, tls_port, pki)
    finally:
        server.stop()


def test_a_producer_enqueues_over_tls_and_a_worker_connection_reads_it(tls_redis, monkeypatch):
    from producer.api import Producer
    from worker.jobs import FrameJob, FrameQueue
    from worker.serializer import MsgpackSerializer

    for key, value in tls_redis.env("camera").items():
        monkeypatch.setenv(key, value)
    with Producer(None, station="tls-line", deadline_s=30) as producer:
        assert producer.connection.connection_pool.connection_class.__name__ == "SSLConnection"
        [job_id] = producer.submit_many([jpeg(seed=3)])

    # What the worker does with the connection `rq worker` built from RQ_REDIS_URL.
    password_file = str(tls_redis.password_file("worker"))
    worker_url = resolve_url(tls_redis.url("worker"), env={"REDIS_PASSWORD_FILE": password_file})
    with with_timeouts(Redis.from_url(worker_url)) as worker:
        queue = FrameQueue(connection=worker)
        assert queue.job_ids == [job_id]
        job = FrameJob.fetch(job_id, connection=worker, serializer=MsgpackSerializer)
        assert job.args[0]["station"] == "tls-line" and job.args[0]["image"] == jpeg(seed=3)
    assert "***" in mask_url(worker_url) and tls_redis.password_file("worker").read_text().strip() not in \
        mask_url(worker_url)


def test_tls_refuses_plaintext_and_clients_without_a_certificate(tls_redis):
    password = tls_redis.password_file("camera").read_text().strip()
    with pytest.raises(RedisConnectionError), Redis(port=tls_redis.tls_port, username="camera", password=password,
                                                    socket_timeout=5) as plain:
        plain.ping()
    no_client_cert = f"rediss://camera@127.0.0.1:{tls_redis.tls_port}/0?ssl_ca_certs={tls_redis.pki['ca']}"
    url = resolve_url(no_client_cert, env={"REDIS_PASSWORD_FILE": str(tls_redis.password_file("camera"))})
    with pytest.raises(RedisConnectionError), Redis.from_url(url, socket_timeout=5) as anonymous:
        anonymous.ping()
