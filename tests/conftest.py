"""The shared fixtures: real services, started on first use and stopped at the end of the session, and each test's
names, database and daemon ``setup`` on them.

How each backend is chosen is in ``tests/support/kafka.py``, ``tests/support/tls.py`` and ``tests/support/postgres.py``.
Each start is announced on the terminal as it happens and listed again in a "services" section at the end of the run,
so ``pytest -q`` shows what the tests ran against. When no backend exists the tests that need it are skipped with the
reason, loudly; with ``CI`` set they fail instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

import pytest

from tests.support.common import ServiceUnavailable, unique_name
from tests.support.kafka import KafkaService, start_kafka, start_tansu_service
from tests.support.postgres import PostgresService, create_database, drop_database, start_postgres
from tests.support.tls import SecureKafkaService, start_secure_kafka

if TYPE_CHECKING:
    from tests.support.harness import Setup

_REPORT = pytest.StashKey[list[str]]()
_Service = TypeVar("_Service", KafkaService, SecureKafkaService, PostgresService)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_REPORT] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    lines = config.stash.get(_REPORT, [])
    if lines:
        terminalreporter.section("services")
        for line in lines:
            terminalreporter.write_line(line)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _announce(config: pytest.Config, line: str) -> None:
    """Write ``line`` to the terminal now, past output capture, and keep it for the end-of-run summary."""
    config.stash[_REPORT].append(line)
    reporter = config.pluginmanager.getplugin("terminalreporter")
    capture = config.pluginmanager.getplugin("capturemanager")
    if reporter is None:
        return
    if capture is None:
        reporter.write_line(f"[services] {line}")
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"[services] {line}")


def _start(config: pytest.Config, what: str, start: Callable[[], _Service]) -> _Service:
    try:
        service = start()
    except ServiceUnavailable as exc:
        unavailable = exc
    else:
        detail = f" ({service.detail})" if service.detail else ""
        _announce(config, f"{what}: {service.backend} at {service.address}, up in {service.startup_s:.1f} s{detail}")
        return service
    # Outside the except block, so the report is the reason alone, not a chained traceback.
    if _in_ci():
        _announce(config, f"{what}: UNAVAILABLE, failing because CI is set: {unavailable}")
        pytest.fail(f"{what} unavailable and CI is set, so this is a failure, not a skip: {unavailable}", pytrace=False)
    _announce(config, f"{what}: UNAVAILABLE, SKIPPING the tests that need it: {unavailable}")
    pytest.skip(f"{what} unavailable: {unavailable}")


@pytest.fixture(scope="session")
def kafka(pytestconfig: pytest.Config) -> Iterator[KafkaService]:
    """A Kafka-protocol broker for the whole session (Apache Kafka where possible; see tests/support/kafka.py)."""
    service = _start(pytestconfig, "Kafka", start_kafka)
    yield service
    service.stop()


@pytest.fixture(scope="session")
def tansu(pytestconfig: pytest.Config) -> Iterator[KafkaService]:
    """The embedded demo broker itself, whichever broker ``kafka`` is (clients: session.timeout.ms <= 6000)."""
    service = _start(pytestconfig, "tansu", start_tansu_service)
    yield service
    service.stop()


@pytest.fixture(scope="session")
def secure_kafka(pytestconfig: pytest.Config) -> Iterator[SecureKafkaService]:
    """Apache Kafka with a SASL_SSL (SCRAM-SHA-512) and an SSL listener, a throwaway CA and one SCRAM user."""
    service = _start(pytestconfig, "Kafka (TLS, SASL/SCRAM)", start_secure_kafka)
    yield service
    service.stop()


@pytest.fixture(scope="session")
def postgres(pytestconfig: pytest.Config) -> Iterator[PostgresService]:
    """A PostgreSQL server for the whole session; tests use ``database_url`` rather than its default database."""
    service = _start(pytestconfig, "PostgreSQL", start_postgres)
    yield service
    service.stop()


@pytest.fixture
def database_url(postgres: PostgresService) -> Iterator[str]:
    """SQLAlchemy URL of a fresh, empty database for this test alone; dropped afterwards."""
    name = unique_name("test")
    url = create_database(postgres.dsn, name)
    yield url
    drop_database(postgres.dsn, name)


@pytest.fixture
def topic_prefix() -> str:
    """A prefix no other test uses, for topic and consumer-group names."""
    return unique_name("test")


@pytest.fixture
def setup(kafka: KafkaService, database_url: str, topic_prefix: str) -> Iterator[Setup]:
    """Topics and group named after ``topic_prefix``; the database migrated (daemons racing to migrate would fail)."""
    # Imported here: the harness loads the shipped model, which unit-test runs need not pay for.
    from spectranet.streamer.runtime import db

    from tests.support.harness import Setup

    db.upgrade(database_url)
    s = Setup(kafka.bootstrap_servers, topic_prefix, database_url)
    yield s
    s.close()
