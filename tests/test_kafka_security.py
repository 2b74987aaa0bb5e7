"""Kafka over TLS and over SASL/SCRAM on a real broker (``secure_kafka``: throwaway CA, one SCRAM-SHA-512 user).

The daemon is configured exactly as an operator would configure it (``kafka.client_properties``, see
docs/kafka-security.md); the checks read the database and the output topic independently of the daemon. Refusals
(wrong password, plaintext client on a TLS listener) must be reported as such within seconds, and the SCRAM
password must appear in neither the logs, the metrics, nor the settings' repr.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from prometheus_client import generate_latest
from spectranet.streamer.app import build_daemon
from spectranet.streamer.config import Settings, load_settings
from spectranet.streamer.contract.codec import Codec
from spectranet.streamer.runtime import db
from spectranet.streamer.runtime.daemon import Daemon
from spectranet.streamer.runtime.kafka_io import ensure_topics
from spectranet.streamer.tools.files import publish_files

from tests.support.common import SPECTRUM_FILES
from tests.support.harness import drain, spectrum_ids
from tests.support.tls import SecureKafkaService

pytestmark = pytest.mark.integration

N = 10


def _settings(bootstrap: str, properties: dict[str, str], prefix: str, tmp_path: Path) -> Settings:
    return load_settings(
        kafka={"bootstrap_servers": bootstrap, "group_id": f"{prefix}-g", "input_topics": [f"{prefix}-in"],
               "output_topic": f"{prefix}-out", "session_timeout_ms": 6000, "client_properties": properties},
        database={"url": f"sqlite:///{tmp_path / 'secure.sqlite'}"}, batch={"max_packets": 8, "max_wait_s": 0.5})


def _through_the_daemon(settings: Settings, properties: dict[str, str]) -> tuple[Daemon, list[str]]:
    """Publish N spectra and run the daemon over them, all with ``properties``; returns (daemon, output ids)."""
    k = settings.kafka
    ensure_topics(k, [*k.input_topics, k.output_topic, k.dead_letter_topic])
    n, errors = publish_files(SPECTRUM_FILES[:N], topic=k.input_topics[0], bootstrap_servers=k.bootstrap_servers,
                              extra_config=properties)
    assert (n, errors) == (N, [])
    daemon = build_daemon(settings, serve_metrics=False)
    stats = daemon.run(max_messages=N, idle_timeout_s=60)
    assert (stats.classified, stats.dead_lettered) == (N, 0)

    engine = sa.create_engine(settings.database.url.get_secret_value())
    with engine.connect() as conn:
        rows = [r[0] for r in conn.execute(sa.select(db.classifications.c.spectrum_id))]
    engine.dispose()
    assert len(rows) == N and set(rows) == spectrum_ids(SPECTRUM_FILES[:N])

    out = drain(k.bootstrap_servers, k.output_topic, N, timeout_s=60.0, **properties)  # timeout_s: not a property
    ids = [Codec("annotated_spectrum").decode(m.value())["spectrum_id"] for m in out]
    assert len(ids) == N and set(ids) == set(rows)
    return daemon, ids


def test_daemon_over_sasl_ssl_scram_and_no_secret_leaks(secure_kafka: SecureKafkaService, topic_prefix: str,
                                                        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # librdkafka's own debug output of its configuration and security handshake goes to the daemon's logger too.
    properties = {**secure_kafka.sasl_ssl_properties(), "debug": "conf,security"}
    caplog.set_level(logging.DEBUG)  # the root logger
    caplog.set_level(logging.DEBUG, logger="streamer")
    settings = _settings(secure_kafka.sasl_ssl_bootstrap, properties, topic_prefix, tmp_path)

    daemon, _ = _through_the_daemon(settings, properties)

    secret = secure_kafka.password
    assert caplog.records, "nothing was logged: the leak check below would prove nothing"
    assert any("SCRAM" in r.getMessage() for r in caplog.records), "librdkafka's security debug was not captured"
    assert secret not in caplog.text
    assert all(secret not in r.getMessage() for r in caplog.records)
    metrics = generate_latest(daemon.metrics.registry).decode()
    assert "spectranet_spectra" in metrics and secret not in metrics
    assert secret not in repr(settings) and secret not in str(settings)
    assert secret not in repr(settings.kafka) and secret not in settings.model_dump_json()


def test_daemon_over_ssl(secure_kafka: SecureKafkaService, topic_prefix: str, tmp_path: Path) -> None:
    properties = secure_kafka.ssl_properties()
    _through_the_daemon(_settings(secure_kafka.ssl_bootstrap, properties, topic_prefix, tmp_path), properties)


def _metadata_errors(bootstrap: str, properties: dict[str, str]) -> tuple[KafkaError, list[KafkaError]]:
    """Ask for metadata, which must fail: returns the request's error and those reported on the way."""
    reported: list[KafkaError] = []
    # confluent-kafka annotates AdminClient's conf as scalars only; its C client takes error_cb as the others do.
    admin = AdminClient({"bootstrap.servers": bootstrap, **properties,
                         "error_cb": reported.append})  # type: ignore[dict-item]
    started = time.monotonic()
    with pytest.raises(KafkaException) as refused:
        admin.list_topics(timeout=5)
    assert time.monotonic() - started < 10  # refused, not hanging
    admin.poll(0)  # serve the error callbacks
    return refused.value.args[0], reported


def test_wrong_scram_password_is_refused(secure_kafka: SecureKafkaService, topic_prefix: str, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    wrong = secure_kafka.sasl_ssl_properties(password="not-the-password")
    _, reported = _metadata_errors(secure_kafka.sasl_ssl_bootstrap, wrong)
    assert any(e.code() == KafkaError._AUTHENTICATION for e in reported), reported

    # The spectra are there (published with the right password); the daemon with the wrong one gets none of them.
    right = secure_kafka.sasl_ssl_properties()
    good = _settings(secure_kafka.sasl_ssl_bootstrap, right, topic_prefix, tmp_path).kafka
    ensure_topics(good, [*good.input_topics, good.output_topic, good.dead_letter_topic])
    assert publish_files(SPECTRUM_FILES[:N], topic=good.input_topics[0], bootstrap_servers=good.bootstrap_servers,
                         extra_config=right) == (N, [])
    caplog.set_level(logging.INFO, logger="streamer")
    settings = _settings(secure_kafka.sasl_ssl_bootstrap, wrong, topic_prefix, tmp_path)
    stats = build_daemon(settings, serve_metrics=False).run(max_messages=N, idle_timeout_s=8)
    assert (stats.messages, stats.classified) == (0, 0)
    assert "SASL authentication error" in caplog.text and "invalid credentials" in caplog.text
    assert secure_kafka.password not in caplog.text
    with sa.create_engine(settings.database.url.get_secret_value()).connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(db.classifications)).scalar_one() == 0


@pytest.mark.parametrize("listener", ["sasl_ssl", "ssl"])
def test_plaintext_client_on_a_tls_listener_is_refused(secure_kafka: SecureKafkaService, topic_prefix: str,
                                                       listener: str) -> None:
    bootstrap = getattr(secure_kafka, f"{listener}_bootstrap")
    error, _ = _metadata_errors(bootstrap, {})
    assert error.code() == KafkaError._TRANSPORT
    n, errors = publish_files(SPECTRUM_FILES[:1], topic=f"{topic_prefix}-in", bootstrap_servers=bootstrap, timeout_s=5)
    assert n == 0 and errors


def test_tls_without_the_ca_is_refused(secure_kafka: SecureKafkaService) -> None:
    """The clients verify the broker's certificate: TLS with the system's CAs alone does not connect."""
    _, reported = _metadata_errors(secure_kafka.ssl_bootstrap, {"security.protocol": "SSL"})
    assert any(e.code() == KafkaError._SSL for e in reported), reported
