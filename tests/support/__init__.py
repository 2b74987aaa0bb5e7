"""Support code for the tests: real services to run against, and the helpers tests share. No tests live here.

- ``kafka``: Kafka-protocol brokers (``SPECTRANET_TEST_KAFKA``, testcontainers, Apache Kafka in KRaft mode from
  Maven, tansu) and ``RestartableKafka``, a private broker a test may stop and start.
- ``tls``: a throwaway certificate authority and Apache Kafka with SASL_SSL (SCRAM) and SSL listeners.
- ``postgres``: PostgreSQL servers (``SPECTRANET_TEST_DATABASE_URL``, testcontainers, local or pip-installed
  binaries), a database per test, and ``RestartablePostgres``, a cluster a test may halt and resume.
- ``common``: what those share (``ServiceUnavailable``, ``unique_name``) and the test spectra.
- ``harness``: real packets, publishing, bounded waits, independent checks of rows, topics and offsets, and the
  daemon in a thread or as a subprocess, for the integration tests.
- ``fakes``: in-process stand-ins for the Kafka consumer and producer, and the daemon wired to them.
- ``netproxy``: a TCP forwarder a test can cut and restore (a database outage without stopping the database).

The fixtures built on these (``kafka``, ``tansu``, ``secure_kafka``, ``postgres``, ``database_url``,
``topic_prefix``, ``setup``) are in ``tests/conftest.py``.
"""

import pytest

# The helpers assert (a delivery report failed, a daemon did not stop): let pytest explain those failures as it does
# a test's own asserts. Registered here, before any of these modules is imported.
pytest.register_assert_rewrite("tests.support.harness", "tests.support.fakes")
