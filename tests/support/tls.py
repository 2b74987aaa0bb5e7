"""A throwaway certificate authority and Apache Kafka with TLS and SASL/SCRAM listeners (the ``secure_kafka`` fixture).

``start_secure_kafka`` runs Apache Kafka 4.1.0 from the same Maven classpath as ``tests/support/kafka.py``, with
certificates made by the ``openssl`` command: a CA valid two days and a broker certificate for ``localhost`` and
``127.0.0.1``. It has no other backend: without ``java``, ``mvn`` and ``openssl`` it raises ``ServiceUnavailable``.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from spectranet.streamer.errors import InfrastructureError

from tests.support.common import ServiceUnavailable, no_stop, timed
from tests.support.kafka import KAFKA_VERSION, free_ports, kafka_classpath, run_kraft_broker

__all__ = ["SCRAM_MECHANISM", "SCRAM_USERNAME", "SecureKafkaService", "start_secure_kafka"]

SCRAM_MECHANISM = "SCRAM-SHA-512"
SCRAM_USERNAME = "spectranet"


@dataclass(frozen=True, kw_only=True)
class SecureKafkaService:
    """Apache Kafka with a SASL_SSL listener (SCRAM-SHA-512 over TLS) and an SSL listener (TLS, no client
    certificate), both with a certificate for 127.0.0.1 and localhost signed by a throwaway CA in ``ca_location``.

    ``plaintext_bootstrap`` is the loopback inter-broker listener, for checks that must not go through security.
    """

    backend: str
    sasl_ssl_bootstrap: str
    ssl_bootstrap: str
    plaintext_bootstrap: str
    ca_location: Path
    username: str
    password: str = field(repr=False)
    detail: str = ""
    startup_s: float = 0.0
    stop_fn: Callable[[], None] = field(default=no_stop, repr=False, compare=False)

    @property
    def address(self) -> str:
        return f"SASL_SSL {self.sasl_ssl_bootstrap}, SSL {self.ssl_bootstrap}"

    def sasl_ssl_properties(self, *, password: str | None = None) -> dict[str, str]:
        """librdkafka properties for the SASL_SSL listener (``password`` overrides the right one)."""
        return {
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": SCRAM_MECHANISM,
            "sasl.username": self.username,
            "sasl.password": self.password if password is None else password,
            "ssl.ca.location": str(self.ca_location),
        }

    def ssl_properties(self) -> dict[str, str]:
        """librdkafka properties for the SSL listener."""
        return {"security.protocol": "SSL", "ssl.ca.location": str(self.ca_location)}

    def stop(self) -> None:
        self.stop_fn()


def start_secure_kafka() -> SecureKafkaService:
    """Start Apache Kafka from the Maven classpath with TLS and SASL/SCRAM listeners and throwaway certificates.

    The SCRAM credential is created when the storage is formatted (``--add-scram``), so it exists before the broker
    accepts its first connection. Each listener is checked with a real client before this returns.
    """
    return timed(_start_secure_kafka)


def _start_secure_kafka() -> SecureKafkaService:
    java, mvn, openssl = shutil.which("java"), shutil.which("mvn"), shutil.which("openssl")
    if not (java and mvn and openssl):
        missing = [name for name, path in (("java", java), ("mvn", mvn), ("openssl", openssl)) if not path]
        raise ServiceUnavailable(
            f"no Kafka with TLS and SASL for the integration tests ({', '.join(missing)} not on PATH). "
            "Install Java 17+, Maven and OpenSSL."
        )
    classpath = kafka_classpath(mvn=mvn)

    workdir = Path(tempfile.mkdtemp(prefix="spectranet-kafka-secure-"))
    certs = _make_certificates(openssl, workdir / "tls")
    password = secrets.token_hex(16)
    sasl_port, ssl_port, plaintext_port, controller_port = free_ports(4)
    broker = run_kraft_broker(
        java=java,
        classpath=classpath,
        workdir=workdir,
        listeners={
            "SASL_SSL": ("SASL_SSL", sasl_port),
            "SSL": ("SSL", ssl_port),
            "PLAINTEXT": ("PLAINTEXT", plaintext_port),
        },
        controller_port=controller_port,
        extra_properties=(
            # One PEM file holds the PKCS#8 key (not encrypted: no ssl.key.password) and the certificate chain.
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={certs.keystore}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={certs.ca}",
            "ssl.client.auth=none",
            f"sasl.enabled.mechanisms={SCRAM_MECHANISM}",
            (
                f"listener.name.sasl_ssl.{SCRAM_MECHANISM.lower()}.sasl.jaas.config="
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
        ),
        format_args=("--add-scram", f"{SCRAM_MECHANISM}=[name={SCRAM_USERNAME},password={password}]"),
    )
    service = SecureKafkaService(
        backend=f"apache-kafka-{KAFKA_VERSION} (maven, TLS + SASL/SCRAM)",
        sasl_ssl_bootstrap=f"127.0.0.1:{sasl_port}",
        ssl_bootstrap=f"127.0.0.1:{ssl_port}",
        plaintext_bootstrap=broker.plaintext_bootstrap,
        ca_location=certs.ca,
        username=SCRAM_USERNAME,
        password=password,
        detail=f"CA {certs.ca}; log {broker.log_path}",
        stop_fn=broker.stop,
    )
    try:
        _check_listener(service.sasl_ssl_bootstrap, service.sasl_ssl_properties(), broker.log_path)
        _check_listener(service.ssl_bootstrap, service.ssl_properties(), broker.log_path)
    except BaseException:
        broker.stop()
        raise
    return service


class _Certificates(NamedTuple):
    ca: Path  # the CA certificate (PEM): the clients' ssl.ca.location and the broker's truststore
    keystore: Path  # the broker's PKCS#8 key followed by its certificate and the CA's (PEM)


def _make_certificates(openssl: str, folder: Path) -> _Certificates:
    """A throwaway CA and a broker certificate it signed, for DNS:localhost and IP:127.0.0.1, valid two days."""
    folder.mkdir(parents=True)

    def run(*args: str) -> None:
        result = subprocess.run(
            [openssl, *args], cwd=folder, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
            check=False,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr)[-2000:]
            raise InfrastructureError(f"openssl {args[0]} failed in {folder}:\n{output}")

    ec_key = ("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")  # genpkey writes PKCS#8, as Kafka needs
    run("genpkey", *ec_key, "-out", "ca.key")
    run("req", "-x509", "-new", "-key", "ca.key", "-sha256", "-days", "2", "-subj", "/CN=SpectraNet test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-out", "ca.pem")
    run("genpkey", *ec_key, "-out", "broker.key")
    run("req", "-new", "-key", "broker.key", "-subj", "/CN=localhost", "-out", "broker.csr")
    (folder / "broker.ext").write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
    )
    run("x509", "-req", "-in", "broker.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-sha256",
        "-days", "2", "-extfile", "broker.ext", "-out", "broker.pem")
    keystore = folder / "broker-keystore.pem"
    keystore.write_text("".join((folder / name).read_text() for name in ("broker.key", "broker.pem", "ca.pem")))
    return _Certificates(ca=folder / "ca.pem", keystore=keystore)


def _check_listener(bootstrap_servers: str, properties: dict[str, str], log_path: Path) -> None:
    """Raise ``InfrastructureError`` unless a client with ``properties`` gets metadata from ``bootstrap_servers``."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap_servers, **properties})
    try:
        admin.list_topics(timeout=30)
    except KafkaException as exc:
        protocol = properties["security.protocol"]
        raise InfrastructureError(
            f"{protocol} listener {bootstrap_servers} refused a client: {exc}; see {log_path}"
        ) from exc
