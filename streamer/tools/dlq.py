"""Dead letters after the fact: list them, and replay them once the cause is fixed (``spectranet dlq ...``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

import sqlalchemy as sa
from confluent_kafka import KafkaError
from spectranet.streamer.config import KafkaSettings
from spectranet.streamer.errors import InfrastructureError
from spectranet.streamer.runtime.db import dead_letters
from spectranet.streamer.runtime.kafka_io import KafkaWatch, make_producer
from sqlalchemy.engine import Engine

__all__ = ["list_dead_letters", "replay_dead_letters"]


def list_dead_letters(db_engine: Engine, *, limit: int = 50, error_class: str | None = None,
                      since: datetime | None = None) -> Sequence[sa.RowMapping]:
    q = sa.select(dead_letters.c.source_topic, dead_letters.c.source_partition, dead_letters.c.source_offset,
                  dead_letters.c.spectrum_id, dead_letters.c.error_class, dead_letters.c.error_field,
                  dead_letters.c.error_message, dead_letters.c.failed_at)
    if error_class:
        q = q.where(dead_letters.c.error_class == error_class)
    if since:
        q = q.where(dead_letters.c.failed_at >= since)
    with db_engine.connect() as conn:
        return conn.execute(q.order_by(dead_letters.c.failed_at.desc()).limit(limit)).mappings().all()


def replay_dead_letters(db_engine: Engine, kafka: KafkaSettings | Mapping[str, str], *, topic: str | None = None,
                        error_class: str | None = None, since: datetime | None = None,
                        timeout_s: float = 60.0) -> int:
    """Publish the stored original bytes again, to their source topic (or ``topic``); returns how many were sent.

    ``kafka``: the Kafka settings or a client config (``KafkaSettings.client_config()``). Raises
    ``InfrastructureError`` naming how many were not delivered within ``timeout_s``.
    """
    q = sa.select(dead_letters.c.source_topic, dead_letters.c.payload).where(dead_letters.c.payload.is_not(None))
    if error_class:
        q = q.where(dead_letters.c.error_class == error_class)
    if since:
        q = q.where(dead_letters.c.failed_at >= since)
    bootstrap = kafka.bootstrap_servers if isinstance(kafka, KafkaSettings) else str(kafka.get("bootstrap.servers"))
    watch = KafkaWatch(bootstrap_servers=bootstrap)
    producer = make_producer(kafka, overrides={"message.timeout.ms": max(int(timeout_s * 1000), 1)}, watch=watch)
    reports: list[str] = []  # "" for a delivered one, else the error
    n = 0

    def on_delivery(err: KafkaError | None, _msg: object) -> None:
        reports.append(err.str() if err is not None else "")

    with db_engine.connect() as conn:
        for row in conn.execute(q.order_by(dead_letters.c.failed_at)):
            producer.produce(topic or row.source_topic, value=row.payload, on_delivery=on_delivery)
            producer.poll(0)
            n += 1
    if producer.flush(timeout_s):
        producer.purge()  # what is still queued or in flight fails now, with a delivery report each
        producer.flush(1.0)
    undelivered = n - reports.count("")
    if undelivered:
        why = str(watch.problem) if watch.problem is not None else next((r for r in reports if r), "no report")
        raise InfrastructureError(f"replay incomplete: {undelivered} of {n} dead letters not delivered "
                                  f"within {timeout_s:g} s: {why}")
    return n
