"""Fixtures for real services, started on first use and stopped at the end of the session.

How each backend is chosen is in ``tests/services.py``. Each start is announced on the terminal as it happens and
listed again in a "services" section at the end of the run, so ``pytest -q`` shows what the tests ran against. When
no backend exists the tests that need it are skipped with the reason, loudly; with ``CI`` set they fail instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from tests import services

_REPORT = pytest.StashKey[list[str]]()
_Service = TypeVar("_Service", services.KafkaService, services.SecureKafkaService, services.PostgresService)


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
    except services.ServiceUnavailable as exc:
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
def kafka(pytestconfig: pytest.Config) -> Iterator[services.KafkaService]:
    """A Kafka-protocol broker for the whole session (Apache Kafka where possible; see tests/services.py)."""
    service = _start(pytestconfig, "Kafka", services.start_kafka)
    yield service
    service.stop()


@pytest.fixture(scope="session")
def tansu(pytestconfig: pytest.Config) -> Iterator[services.KafkaService]:
    """The embedded demo broker itself, whichever broker ``kafka`` is (clients: session.timeout.ms <= 6000)."""
    service = _start(pytestconfig, "tansu", services.start_tansu_service)
    yield service
    service.stop()


@pytest.fixture(scope="session")
def secure_kafka(pytestconfig: pytest.Config) -> Iterator[services.SecureKafkaService]:
    """Apache Kafka with a SASL_SSL (SCRAM-SHA-512) and an SSL listener, a throwaway CA and one SCRAM user."""
    service = _start(pytestconfig, "Kafka (TLS, SASL/SCRAM)", services.start_secure_kafka)
    yield service
    service.stop()


@pytest.fixture(scope="session")
def postgres(pytestconfig: pytest.Config) -> Iterator[services.PostgresService]:
    """A PostgreSQL server for the whole session; tests use ``database_url`` rather than its default database."""
    service = _start(pytestconfig, "PostgreSQL", services.start_postgres)
    yield service
    service.stop()


@pytest.fixture
def database_url(postgres: services.PostgresService) -> Iterator[str]:
    """SQLAlchemy URL of a fresh, empty database for this test alone; dropped afterwards."""
    name = services.unique_name("test")
    url = services.create_database(postgres.dsn, name)
    yield url
    services.drop_database(postgres.dsn, name)


@pytest.fixture
def topic_prefix() -> str:
    """A prefix no other test uses, for topic and consumer-group names."""
    return services.unique_name("test")
