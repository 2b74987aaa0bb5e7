"""Re-classify stored spectra with another model (``spectranet reprocess --model PATH``).

Needs packets stored with ``database.store_arrays = true``. New rows are keyed by the new model's name and
version, so earlier models' rows stay and ``class_changes_between_models`` shows what changed.

Failures do not stop the run; they are counted as ``failed``:

- a stored packet the new model cannot use (it no longer decodes, validates or prepares) is a dead letter of
  ``SpectrumClassifier.execute``;
- a spectrum whose new rows the database refuses for a reason in the data (a value longer than a column altered by
  hand, a character it cannot hold, an integrity error: ``whose_fault(exc, stage="store")``) is isolated by the
  daemon's own rule, ``daemon.store_isolating``: the batch is split until the refused spectrum is alone, the rest of
  the batch is written, and the spectrum is logged (ERROR, with its ``spectrum_id`` and the column when
  ``db.unstorable_column`` can tell).

Neither is stored in ``dead_letters``, unlike in the daemon, on purpose: that table is keyed by the Kafka message
(topic, partition, offset) and ``spectranet dlq replay`` sends its rows back to the input topic, but here the message
was consumed and classified already (its earlier rows stay); a row there would claim the daemon dead-lettered it and
a replay would feed it to the daemon's model again. The log and the count are the record; reprocess again once the
cause is fixed (it is idempotent). The infrastructure's failures (a lost connection, a missing table) are raised and
end the run, as before; what was written stays.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone

import sqlalchemy as sa
from spectranet.streamer.errors import PacketError
from spectranet.streamer.runtime import db
from spectranet.streamer.runtime.classifier import Classified, SpectrumClassifier, StoredMessage
from spectranet.streamer.runtime.daemon import refused_rows_error, store_isolating
from sqlalchemy.engine import Engine

__all__ = ["reprocess"]

log = logging.getLogger(__name__)


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
    """Returns (classified, failed): spectra stored (or already there) and spectra that could not be (see the module
    docstring). Idempotent: running it twice with the same model adds nothing."""
    m = classifier.model
    db.register_model(db_engine, name=m.name, version=m.version, weights_sha256=m.weights_sha256,
                      taxonomy=m.taxonomy, model_metadata=m.card())
    classified = failed = 0

    def write(items: Sequence[Classified]) -> None:
        db.write_batch(db_engine, [c.rows for c in items])

    def refused(c: Classified, fault: PacketError) -> list[Classified]:
        err = refused_rows_error(db_engine, c.rows, fault)
        log.error("reprocess: %s; counted as failed, not stored", err)  # names the spectrum, and the column if known
        return []

    for messages in _stored(db_engine, batch_size):
        outcome = classifier.execute(messages, consumed_at=datetime.now(timezone.utc))
        stored = store_isolating(outcome.classified, write, refused)
        classified += len(stored)
        failed += len(outcome.dead) + len(outcome.classified) - len(stored)
    return classified, failed
