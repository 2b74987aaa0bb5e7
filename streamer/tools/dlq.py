"""Dead letters after the fact: list them, and replay them once the cause is fixed (``spectranet dlq ...``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from confluent_kafka import Producer
from spectranet.streamer.runtime.db import dead_letters
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


def replay_dead_letters(db_engine: Engine, producer_config: dict[str, Any], *, topic: str | None = None,
                        error_class: str | None = None, since: datetime | None = None,
                        timeout_s: float = 60.0) -> int:
    """Publish the stored original bytes again, to their source topic (or ``topic``); returns how many were sent."""
    q = sa.select(dead_letters.c.source_topic, dead_letters.c.payload).where(dead_letters.c.payload.is_not(None))
    if error_class:
        q = q.where(dead_letters.c.error_class == error_class)
    if since:
        q = q.where(dead_letters.c.failed_at >= since)
    producer = Producer({**producer_config, "enable.idempotence": True})
    failures: list[str] = []
    n = 0
    with db_engine.connect() as conn:
        for row in conn.execute(q.order_by(dead_letters.c.failed_at)):
            producer.produce(topic or row.source_topic, value=row.payload,
                             on_delivery=lambda err, _m: failures.append(str(err)) if err else None)
            producer.poll(0)
            n += 1
    remaining = producer.flush(timeout_s)
    if remaining or failures:
        raise RuntimeError(f"replay incomplete: {remaining} undelivered, {len(failures)} failed: {failures[:3]}")
    return n
