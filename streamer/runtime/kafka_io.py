"""Kafka clients for the daemon: the settings that carry the delivery guarantee, in one place."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from spectranet.streamer.config import KafkaSettings

__all__ = ["consumer_config", "producer_config", "make_consumer", "make_producer", "ensure_topics"]

log = logging.getLogger(__name__)


def consumer_config(k: KafkaSettings) -> dict[str, object]:
    static = {"group.instance.id": k.group_instance_id} if k.group_instance_id else {}
    return {
        **static,
        **k.client_config(),
        "group.id": k.group_id,
        # Offsets are committed by the daemon, synchronously, after the database commit and the delivery reports.
        "enable.auto.commit": False,
        "auto.offset.reset": k.auto_offset_reset,
        "session.timeout.ms": k.session_timeout_ms,
        "max.poll.interval.ms": k.max_poll_interval_ms,
        # Incremental rebalances: a member joining does not stop the others' partitions.
        "partition.assignment.strategy": "cooperative-sticky",
        "fetch.message.max.bytes": k.max_message_bytes,
        "enable.partition.eof": False,
        # Pre-fetch buffer (librdkafka default 64 MB): 16 MB is still hundreds of packets ahead of a batch.
        "queued.max.messages.kbytes": 16384,
    }


def producer_config(k: KafkaSettings) -> dict[str, object]:
    return {
        **k.client_config(),
        # Idempotent producer: broker-side de-duplication of retries, ordering kept per partition.
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 20,
        "compression.type": "lz4",
        "message.max.bytes": max(k.max_message_bytes + 65536, 1_000_000),
    }


def make_consumer(k: KafkaSettings) -> Consumer:
    return Consumer(consumer_config(k), logger=log)


def make_producer(k: KafkaSettings) -> Producer:
    return Producer(producer_config(k), logger=log)


def ensure_topics(k: KafkaSettings, topics: Iterable[str], *, partitions: int = 1, timeout_s: float = 30.0) -> None:
    """Create missing topics (demo and tests; production topics are usually managed by the operator)."""
    admin = AdminClient(k.client_config())
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    new = [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics if t not in existing]
    if not new:
        return
    for future in admin.create_topics(new, operation_timeout=timeout_s).values():
        try:
            future.result(timeout_s)
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise
