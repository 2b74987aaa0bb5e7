"""Re-classify stored spectra with another model (``spectranet reprocess --model PATH``).

Needs packets stored with ``database.store_arrays = true``. New rows are keyed by the new model's name and
version, so earlier models' rows stay and ``class_changes_between_models`` shows what changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone

import sqlalchemy as sa
from spectranet.streamer.runtime import db
from spectranet.streamer.runtime.classifier import SpectrumClassifier, StoredMessage
from sqlalchemy.engine import Engine

__all__ = ["reprocess"]


def _stored(db_engine: Engine, batch_size: int) -> Iterator[list[StoredMessage]]:
    s, c = db.spectra, db.classifications
    source = (sa.select(c.c.spectrum_id, c.c.revision, sa.func.min(c.c.source_topic).label("topic"),
                        sa.func.min(c.c.source_partition).label("partition"),
                        sa.func.min(c.c.source_offset).label("offset"))
              .group_by(c.c.spectrum_id, c.c.revision).subquery())
    q = (sa.select(s.c.raw_packet, source.c.topic, source.c.partition, source.c.offset)
         .join(source, sa.and_(source.c.spectrum_id == s.c.spectrum_id, source.c.revision == s.c.revision))
         .where(s.c.raw_packet.is_not(None)).order_by(s.c.received_at))
    with db_engine.connect() as conn:
        batch: list[StoredMessage] = []
        for row in conn.execute(q).yield_per(batch_size):
            batch.append(StoredMessage(row.topic, row.partition, row.offset, row.raw_packet))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


def reprocess(db_engine: Engine, classifier: SpectrumClassifier, *, batch_size: int = 256) -> tuple[int, int]:
    """Returns (classified, failed). Idempotent: running it twice with the same model adds nothing."""
    m = classifier.model
    db.register_model(db_engine, name=m.name, version=m.version, weights_sha256=m.weights_sha256,
                      taxonomy=m.taxonomy, model_metadata=m.card())
    classified = failed = 0
    for messages in _stored(db_engine, batch_size):
        outcome = classifier.execute(messages, consumed_at=datetime.now(timezone.utc))
        db.write_batch(db_engine, [r.rows for r in outcome.classified])
        classified += len(outcome.classified)
        failed += len(outcome.dead)
    return classified, failed
