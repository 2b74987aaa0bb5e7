"""The services the integration tests run against are real: messages make a round trip, SQL runs."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from tests.support.kafka import KafkaService

pytestmark = pytest.mark.integration

N_MESSAGES = 10


def _round_trip(broker: KafkaService, prefix: str) -> None:
    """Create a topic, produce N_MESSAGES keyed messages, consume them in a new group, compare."""
    topic = f"{prefix}.round_trip"
    admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(timeout=30)

    failures: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            failures.append(err)

    producer = Producer({"bootstrap.servers": broker.bootstrap_servers, "enable.idempotence": True})
    sent = [(f"key-{i}".encode(), f"value-{i}".encode()) for i in range(N_MESSAGES)]
    for key, value in sent:
        producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
    assert producer.flush(30) == 0, "messages still in flight after 30 s"
    assert failures == []

    consumer = Consumer(
        {
            "bootstrap.servers": broker.bootstrap_servers,
            "group.id": f"{prefix}.group",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            **broker.consumer_settings,  # session.timeout.ms=6000 on tansu
        }
    )
    received: list[tuple[bytes | None, bytes | None]] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 60
        while len(received) < N_MESSAGES and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            if msg.error() is not None:
                raise KafkaException(msg.error())
            received.append((msg.key(), msg.value()))
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    assert received == sent


def test_kafka_round_trip(kafka: KafkaService, topic_prefix: str) -> None:
    _round_trip(kafka, topic_prefix)


def test_tansu_round_trip(tansu: KafkaService, topic_prefix: str) -> None:
    assert int(tansu.consumer_settings["session.timeout.ms"]) <= 6000  # else the first assignment takes ~23 s
    _round_trip(tansu, topic_prefix)


@pytest.mark.parametrize("run", [1, 2])  # the second run would find the first run's table without isolation
def test_postgres_is_real_and_each_test_gets_a_fresh_database(database_url: str, run: int) -> None:
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            version = conn.execute(sa.text("SELECT version()")).scalar_one()
            assert version.startswith("PostgreSQL")
            assert conn.execute(sa.text("SELECT current_database()")).scalar_one() == sa.make_url(database_url).database
            tables = conn.execute(sa.text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")).scalar_one()
            assert tables == 0

            conn.execute(sa.text("CREATE TABLE spectra (id text PRIMARY KEY, redshift double precision)"))
            conn.execute(
                sa.text("INSERT INTO spectra VALUES (:id, :z)"),
                [{"id": "ZTF24aaaaaaa", "z": 0.031}, {"id": "ZTF24aaaaaab", "z": 0.12}],
            )
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, redshift FROM spectra ORDER BY id")).all()
        assert [tuple(row) for row in rows] == [("ZTF24aaaaaaa", 0.031), ("ZTF24aaaaaab", 0.12)]
    finally:
        engine.dispose()

