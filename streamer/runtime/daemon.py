"""The consumer loop: poll -> decode -> validate -> preprocess -> classify -> write -> publish -> commit.

Two threads: the main thread polls, classifies and commits; a delivery thread writes the database and publishes,
so batch N's I/O overlaps batch N+1's inference. Commits stay in order on the main thread, and at most one batch
is ever delivered but uncommitted.

Delivery guarantee: at-least-once with idempotent effects. A batch's offsets are committed (synchronously) only after
its database transaction has committed *and* every annotated packet and dead letter has a successful delivery report.
If the process dies in between, the batch is consumed again; the database ignores rows it already has (unique per
spectrum, revision and model) and annotated packets carry a deterministic ``annotation_id`` so subscribers can
de-duplicate.

No poison pills: every exception on a packet's path is sorted by ``classifier.whose_fault``. The packet's fault
(it cannot be decoded, breaks the contract or the model, its annotation cannot be encoded, the database refuses its
row) dead-letters that packet, to the topic and the table with the reason, and its batch goes on: a batch the
database refuses for its data is split until the refused rows are alone (``store_isolating``, the rule
``spectranet reprocess`` follows too), and a dead letter the table cannot hold as is is stored sanitised, or as a
minimal record, never retried. The infrastructure's fault (broker, database, schema registry unavailable) is retried
with backoff and is never dead-lettered or committed. A retry repeats only what failed: a written batch is not
written again, and a message with a delivery report is not published again. A dead letter too large for the
dead-letter topic is published without its payload (header ``spectranet.payload.truncated``: the original size; the
bytes stay in the ``dead_letters`` table). While consumed packets wait longer than ``stall_timeout_s`` for a commit,
``/healthz`` and ``/readyz`` say so (``metrics.Progress``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

import sqlalchemy as sa
from confluent_kafka import OFFSET_END, KafkaError, KafkaException, TopicPartition
from spectranet.streamer.contract.codec import Codec, Framing
from spectranet.streamer.errors import InfrastructureError, PacketError, StorageError
from spectranet.streamer.runtime import db
from spectranet.streamer.runtime.classifier import (
    BatchOutcome,
    Classified,
    DeadLetter,
    Message,
    SpectrumClassifier,
    dead_letter,
    where,
    whose_fault,
)
from spectranet.streamer.runtime.metrics import HealthServer, Metrics
from sqlalchemy.engine import Engine

__all__ = ["Daemon", "RunStats", "refused_rows_error", "store_isolating"]

log = logging.getLogger(__name__)

# Failures retried with backoff (the infrastructure's; the packet's never get this far: see whose_fault).
_RETRIED = (InfrastructureError, sa.exc.SQLAlchemyError, KafkaException, OSError)
_RECORD_OVERHEAD_BYTES = 1024  # Kafka's record and batch framing, on top of key, value and headers
_MAX_STRIPPED_KEY_BYTES = 1024  # a dead letter sent without its payload drops a key larger than this too

_Item = TypeVar("_Item")


def store_isolating(items: Sequence[_Item], write: Callable[[Sequence[_Item]], None],
                    refused: Callable[[_Item, PacketError], list[_Item]]) -> list[_Item]:
    """The isolation rule for storing, shared by the daemon (``Daemon._store_isolating``) and ``spectranet
    reprocess``: ``write(items)`` in one transaction; if the database refuses it for a reason in the data
    (``whose_fault(exc, stage="store")``: a value too long, a character it cannot hold, an integrity error), split
    ``items`` in halves until each refused item is alone, and put ``refused(item, reason)`` in that item's place.

    Returns what was stored, in order (``refused``'s replacements included; it may return ``[]`` to drop the item).
    Raises the infrastructure's failures (a lost connection, a missing table: ``whose_fault`` returns None), from
    ``write`` or from ``refused``, at once and unchanged: the caller retries or stops, nothing is half-isolated.
    """
    try:
        write(items)
        return list(items)
    except Exception as exc:  # noqa: BLE001 - sorted by whose_fault; the infrastructure's is re-raised
        fault = whose_fault(exc, stage="store")
        if fault is None:
            raise
    if len(items) > 1:
        log.warning("the database refused a batch of %d rows (%s); splitting it to isolate the refused rows",
                    len(items), fault.reason)
        half = len(items) // 2
        return store_isolating(items[:half], write, refused) + store_isolating(items[half:], write, refused)
    return refused(items[0], fault)


def refused_rows_error(database: Engine, rows: db.ClassificationRow, fault: PacketError) -> StorageError:
    """The ``StorageError`` for one spectrum's rows the database refused alone with ``fault``: it names the spectrum
    and, when it can be told, the column (``db.unstorable_column``, against the live tables)."""
    column = (db.unstorable_column(database, db.spectra, rows.spectrum)
              or db.unstorable_column(database, db.classifications, rows.classification))
    return StorageError(fault.reason, field=column, packet_id=rows.spectrum.get("spectrum_id"))


@dataclass
class RunStats:
    batches: int = 0
    classified: int = 0
    dead_lettered: int = 0
    committed: dict[tuple[str, int], int] = field(default_factory=dict)

    @property
    def messages(self) -> int:
        return self.classified + self.dead_lettered


@dataclass(frozen=True)
class _Outgoing:
    """One message to publish: an annotated packet, or a dead letter (``dead``; ``stripped``: sent without payload)."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None
    dead: DeadLetter | None = None
    stripped: bool = False


@dataclass
class _Delivery:
    """One batch on its way out, and how far it got, so that a retry repeats only what failed."""

    annotated: list[tuple[Classified, bytes]]  # classified packets with their encoded annotations
    dead: list[DeadLetter]
    offsets: list[TopicPartition]
    written: bool = False                           # the database has every row (rows it refused moved to ``dead``)
    outgoing: list[_Outgoing] = field(default_factory=list)
    delivered: set[int] = field(default_factory=set)  # indexes into ``outgoing`` with a successful delivery report

    @property
    def packets(self) -> int:
        return len(self.annotated) + len(self.dead)

    @property
    def outcome(self) -> BatchOutcome:
        return BatchOutcome(classified=[c for c, _ in self.annotated], dead=list(self.dead), offsets=self.offsets)


class Daemon:
    """Owns the clients; runs ``SpectrumClassifier`` over micro-batches and enforces the delivery guarantee."""

    def __init__(self, *, consumer: Any, producer: Any, database: Engine, classifier: SpectrumClassifier,
                 input_topics: Sequence[str], output_topic: str, dead_letter_topic: str, output_codec: Codec,
                 output_framing: Framing = "schemaless", max_packets: int = 64, max_wait_s: float = 1.0,
                 retry_backoff_s: float = 1.0, retry_backoff_max_s: float = 30.0,
                 delivery_timeout_s: float = 60.0, metrics: Metrics | None = None,
                 health: HealthServer | None = None, pipelined: bool = True,
                 start_at_ms: int | None = None, dead_letter_max_bytes: int = 1_000_000,
                 stall_timeout_s: float = 120.0) -> None:
        self.consumer, self.producer, self.database = consumer, producer, database
        self.classifier = classifier
        self.input_topics = list(input_topics)
        self.output_topic, self.dead_letter_topic = output_topic, dead_letter_topic
        self.output_codec, self.output_framing = output_codec, output_framing
        self.max_packets, self.max_wait_s = max_packets, max_wait_s
        self.retry_backoff_s, self.retry_backoff_max_s = retry_backoff_s, retry_backoff_max_s
        self.delivery_timeout_s = delivery_timeout_s
        self.dead_letter_max_bytes = dead_letter_max_bytes  # key + value + headers of one dead-letter message
        self.stall_timeout_s = stall_timeout_s
        self.metrics = metrics or Metrics()
        self.health = health
        self.stats = RunStats()
        self._revoked: set[tuple[str, int]] = set()
        self.pipelined = pipelined
        self.start_at_ms = start_at_ms  # replay: newly assigned partitions start at this time, not at commits
        self._delivery = ThreadPoolExecutor(max_workers=1, thread_name_prefix="delivery")
        self._inflight: tuple[_Delivery, Future[None] | None] | None = None

    def run(self, stop: threading.Event | None = None, *, max_messages: int | None = None,
            idle_timeout_s: float | None = None) -> RunStats:
        """Run until ``stop`` is set, ``max_messages`` are committed, or nothing arrives for ``idle_timeout_s``.

        Pipelined: while batch N is written and published on the delivery thread, batch N+1 is polled, decoded,
        preprocessed and classified here; N is committed (here, in order) before N+1's delivery starts, so at most
        one batch is ever uncommitted. ``stop`` (SIGTERM/SIGINT) is honoured between batches: the batch in flight
        is finished and committed, unless its delivery keeps failing, in which case it is left for redelivery.
        """
        stop = stop or threading.Event()
        progress = self.metrics.progress
        progress.stall_timeout_s = self.stall_timeout_s
        m = self.classifier.model
        db.register_model(self.database, name=m.name, version=m.version, weights_sha256=m.weights_sha256,
                          taxonomy=m.taxonomy, model_metadata=m.card())
        self.metrics.model_info.labels(m.name, m.version, m.weights_sha256,
                                       str(self.classifier.engine.device)).set(1)
        self.consumer.subscribe(self.input_topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_revoke)
        if self.health is not None:
            self.health.ready.set()  # the engine has run its warm-up batch; the consumer is subscribed
        progress.committed()  # the stall clock starts now, not when the process did
        last_message = time.monotonic()
        try:
            while not stop.is_set():
                if self.health is not None:
                    self.health.beat()
                messages = self._poll()                                           # consume
                delivery = None
                if messages:
                    last_message = time.monotonic()
                    progress.holding(len(messages) + (self._inflight[0].packets if self._inflight else 0))
                    with self.metrics.stage_seconds.labels("execute").time():      # decode .. classify, encode
                        delivery = self._execute(messages, stop)
                    if delivery is None:                                           # stopped while retrying
                        break
                if self._inflight is not None and not self._finish(stop):          # commit the previous batch
                    break
                progress.holding(delivery.packets if delivery is not None else 0)
                if max_messages is not None and self.stats.messages >= max_messages:
                    break
                if delivery is None:
                    if idle_timeout_s is not None and time.monotonic() - last_message > idle_timeout_s:
                        break
                    continue
                if self.pipelined:                                                 # write, publish (background)
                    self._inflight = (delivery, self._delivery.submit(self._write_and_publish, delivery))
                else:
                    self._inflight = (delivery, None)
                    if not self._finish(stop):
                        break
                    progress.holding(0)
                if max_messages is not None and self.stats.messages >= max_messages:
                    break
            if self._inflight is not None:
                self._finish(stop)
        finally:
            if self.health is not None:
                self.health.stop()
            self._delivery.shutdown(wait=True)
            self.producer.flush(self.delivery_timeout_s)
            self.consumer.close()
        return self.stats

    def _execute(self, messages: list[Message], stop: threading.Event) -> _Delivery | None:
        """Classify and encode a batch: every packet ends annotated or dead-lettered. The infrastructure's failures
        here (a schema registry that does not answer) are retried; None: stopped meanwhile."""
        outcomes: list[BatchOutcome] = []
        if not self._with_retries(lambda: outcomes.append(
                self.classifier.execute(messages, consumed_at=datetime.now(timezone.utc))), stop):
            return None
        outcome = outcomes[-1]
        annotated, dead = [], list(outcome.dead)
        for c in outcome.classified:
            try:
                annotated.append((c, self.output_codec.encode(c.annotation, framing=self.output_framing)))
            except Exception as exc:  # noqa: BLE001 - sorted by whose_fault; the infrastructure's is re-raised
                sid = c.annotation.get("spectrum_id")
                err = whose_fault(exc, stage="process", packet_id=sid)
                if err is None:
                    raise
                log.error("the annotation of %s cannot be encoded", where(c.message), exc_info=exc)
                dead.append(dead_letter(c.message, err, {"spectrum_id": sid}))
        return _Delivery(annotated=annotated, dead=dead, offsets=outcome.offsets)

    def _finish(self, stop: threading.Event) -> bool:
        """Wait for the batch in flight, retrying its delivery if it failed, then commit it. False: gave up on stop."""
        assert self._inflight is not None
        delivery, future = self._inflight
        self._inflight = None  # a revocation during retries must not try to settle it again
        failed = future is None
        if future is not None:
            try:
                future.result()
            except _RETRIED as exc:
                self.metrics.infrastructure_retries.inc()  # retried below; counted even if that retry succeeds
                self.metrics.progress.last_failure = _summary(exc)
                log.error("delivery failed, retrying (nothing committed): %s", _summary(exc))
                failed = True

        def deliver() -> None:
            if failed:
                self._write_and_publish(delivery)  # repeats only what is not done yet
            self._commit(delivery)

        if not self._with_retries(deliver, stop):
            return False
        self._account(delivery)
        return True

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self._revoked -= {(tp.topic, tp.partition) for tp in partitions}
        if self.start_at_ms is not None and partitions:
            # Replay: start at the first offset at or after the time. Assigning here ourselves replaces the
            # client's automatic (incremental, cooperative-sticky) assignment at the committed offsets.
            found = consumer.offsets_for_times(
                [TopicPartition(tp.topic, tp.partition, self.start_at_ms) for tp in partitions], timeout=30)
            consumer.incremental_assign([TopicPartition(at.topic, at.partition,
                                                        at.offset if at.offset >= 0 else OFFSET_END)
                                         for at in found])
        log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions))

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        """Called inside a poll. Finish the batch in flight while we still own its partitions (commit it if its
        delivery succeeded); a batch that cannot be delivered now will not commit the revoked partitions later."""
        if self._inflight is not None:
            delivery, future = self._inflight
            try:
                if future is not None:
                    future.result(timeout=self.delivery_timeout_s)
                    self._inflight = None
                    self._commit(delivery)
                    self._account(delivery)
            except Exception as exc:  # noqa: BLE001 - the main loop retries it; here we only must not commit
                log.warning("batch in flight not committed before revocation (%s); it will be redelivered", exc)
        self._revoked |= {(tp.topic, tp.partition) for tp in partitions}
        for tp in partitions:  # another replica reports these partitions' lag now; a stale series would add to it
            try:
                self.metrics.consumer_lag.remove(tp.topic, str(tp.partition))
            except KeyError:
                pass  # no batch of this partition was committed here
        log.info("revoked %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions))

    def _poll(self) -> list[Message]:
        msgs = self.consumer.consume(num_messages=self.max_packets, timeout=self.max_wait_s)
        good = []
        for msg in msgs:
            err = msg.error()
            if err is None:
                good.append(msg)
            elif err.fatal():
                raise KafkaException(err)
            else:
                log.warning("consumer error (librdkafka retries it): %s", err)
        return good

    def _write_and_publish(self, delivery: _Delivery) -> None:
        """Database transaction, then produce and wait for every delivery report; raises on an infrastructure failure.

        Runs on the delivery thread (the producer and the engine's pool are thread-safe; the consumer is not used),
        or again on the main thread to retry a failure: then only what is not done yet is repeated.
        """
        if not delivery.written:
            with self.metrics.stage_seconds.labels("write").time():
                stored = self._store_isolating([*delivery.annotated, *delivery.dead])
            delivery.annotated = [x for x in stored if not isinstance(x, DeadLetter)]
            delivery.dead = [x for x in stored if isinstance(x, DeadLetter)]
            delivery.outgoing = [
                *(_Outgoing(self.output_topic, c.key, value, None) for c, value in delivery.annotated),
                *(self._dead_letter_message(d) for d in delivery.dead)]
            delivery.written = True
        with self.metrics.stage_seconds.labels("publish").time():
            self._publish(delivery)

    def _store_isolating(self, items: list[tuple[Classified, bytes] | DeadLetter]
                         ) -> list[tuple[Classified, bytes] | DeadLetter]:
        """Write ``items`` in one transaction. If the database refuses it for a reason in the data, split it until
        each refused row is alone (``store_isolating``): a refused classification becomes a dead letter
        (``StorageError``); a refused dead letter is stored as a minimal record, or, if even that is refused, logged
        and left to the topic. Returns the items as stored; raises only for the infrastructure's failures."""
        return store_isolating(items, self._write_items, self._refused)

    def _write_items(self, items: Sequence[tuple[Classified, bytes] | DeadLetter]) -> None:
        db.write_batch(self.database, [x[0].rows for x in items if not isinstance(x, DeadLetter)],
                       [x.row() for x in items if isinstance(x, DeadLetter)])

    def _refused(self, item: tuple[Classified, bytes] | DeadLetter, fault: PacketError
                 ) -> list[tuple[Classified, bytes] | DeadLetter]:
        """What is stored in place of one item the database refused alone (see ``_store_isolating``)."""
        if not isinstance(item, DeadLetter):
            c = item[0]
            err = refused_rows_error(self.database, c.rows, fault)
            return self._store_isolating([dead_letter(c.message, err, {"spectrum_id": err.packet_id})])
        log.error("the database refused the dead letter of %s[%d]@%d (%s); storing a minimal record", item.source.topic,
                  item.source.partition, item.source.offset, fault.reason)
        try:
            db.write_batch(self.database, [], [item.minimal_row(fault.reason)])
        except Exception as exc:  # noqa: BLE001 - sorted by whose_fault; the infrastructure's is re-raised
            if whose_fault(exc, stage="store") is None:
                raise
            log.error("the database refused even the minimal dead letter of %s[%d]@%d (%s); it is on the "
                      "dead-letter topic only", item.source.topic, item.source.partition, item.source.offset, exc)
        return [item]

    def _dead_letter_message(self, d: DeadLetter, *, strip: bool = False) -> _Outgoing:
        """The dead-letter topic's message for ``d``; without its payload (and original headers, and a large key)
        when it would not fit in ``dead_letter_max_bytes`` or the broker refused it (``strip``)."""
        headers = d.kafka_headers()
        size = (len(d.key or b"") + len(d.payload or b"") + sum(len(k) + len(v) for k, v in headers)
                + _RECORD_OVERHEAD_BYTES)
        if not strip and size <= self.dead_letter_max_bytes:
            return _Outgoing(self.dead_letter_topic, d.key, d.payload, headers, dead=d)
        headers = [*d.kafka_headers(original=False),
                   ("spectranet.payload.truncated", str(len(d.payload or b"")).encode()),
                   ("spectranet.payload.stored", b"dead_letters")]
        if d.headers:
            headers.append(("spectranet.headers.dropped", str(len(d.headers)).encode()))
        key = d.key
        if key is not None and len(key) > _MAX_STRIPPED_KEY_BYTES:
            headers.append(("spectranet.key.dropped", str(len(key)).encode()))
            key = None
        log.warning("dead letter of %s[%d]@%d is %d bytes, too large for topic %s: publishing it without its "
                    "payload (the bytes are in the dead_letters table)", d.source.topic, d.source.partition,
                    d.source.offset, size, self.dead_letter_topic)
        return _Outgoing(self.dead_letter_topic, key, None, headers, dead=d, stripped=True)

    def _publish(self, delivery: _Delivery) -> None:
        """Produce every message of ``delivery`` without a delivery report yet and wait for the reports. A dead letter
        the client or broker refuses as too large is sent again without its payload; any other failure raises."""
        remaining = 0
        failures: dict[int, KafkaError] = {}
        for _ in range(2):  # the second round only for dead letters refused as too large
            failures = {}
            for i, out in enumerate(delivery.outgoing):
                if i not in delivery.delivered:
                    try:
                        self._produce(out, _reporter(delivery, failures, i))
                    except KafkaException as exc:  # refused before it was queued (e.g. MSG_SIZE_TOO_LARGE)
                        failures[i] = exc.args[0]
            remaining = self.producer.flush(self.delivery_timeout_s)
            refused = {i: sent.dead for i, failure in failures.items()
                       if (sent := delivery.outgoing[i]).dead is not None and not sent.stripped
                       and whose_fault(KafkaException(failure), stage="publish") is not None}
            if remaining or not refused:
                break
            for i, dead in refused.items():
                delivery.outgoing[i] = self._dead_letter_message(dead, strip=True)
        if remaining or failures:
            shown = [err.str() if isinstance(err, KafkaError) else str(err) for err in failures.values()][:3]
            raise InfrastructureError(f"{remaining} messages undelivered, {len(failures)} failed: {shown}")

    def _produce(self, out: _Outgoing, on_delivery: Callable[[KafkaError | None, Any], None]) -> None:
        try:
            self.producer.produce(out.topic, key=out.key, value=out.value, headers=out.headers,
                                  on_delivery=on_delivery)
        except BufferError:  # the producer's queue is full: let it drain, then once more
            self.producer.flush(self.delivery_timeout_s)
            try:
                self.producer.produce(out.topic, key=out.key, value=out.value, headers=out.headers,
                                      on_delivery=on_delivery)
            except BufferError as exc:
                raise InfrastructureError(f"the producer's queue stays full: {exc}") from exc

    def _commit(self, delivery: _Delivery) -> None:
        """Synchronous commit of the batch's offsets, except partitions revoked meanwhile (their new owner
        reprocesses them; the effects are idempotent)."""
        offsets = [tp for tp in delivery.offsets if (tp.topic, tp.partition) not in self._revoked]
        if len(offsets) < len(delivery.offsets):
            log.warning("not committing revoked partitions; their new owner reprocesses them idempotently")
        if offsets:
            with self.metrics.stage_seconds.labels("commit").time():
                self.consumer.commit(offsets=offsets, asynchronous=False)
        self.metrics.progress.committed()

    def _with_retries(self, action: Callable[[], None], stop: threading.Event) -> bool:
        """Retry infrastructure failures with backoff; partitions are paused meanwhile so the group keeps us."""
        backoff = self.retry_backoff_s
        paused: list[TopicPartition] = []
        try:
            while True:
                try:
                    action()
                    return True
                except _RETRIED as exc:
                    self.metrics.infrastructure_retries.inc()
                    self.metrics.progress.last_failure = _summary(exc)
                    log.error("infrastructure failure, retrying in %.1f s (nothing committed): %s", backoff,
                              _summary(exc))
                if not paused:
                    paused = list(self.consumer.assignment()) if hasattr(self.consumer, "assignment") else []
                    if paused:
                        self.consumer.pause(paused)
                deadline = time.monotonic() + backoff
                while time.monotonic() < deadline:
                    if stop.is_set():
                        return False
                    if self.health is not None:
                        self.health.beat()
                    if paused:  # serve heartbeats and rebalance callbacks; paused partitions return nothing
                        for msg in self.consumer.consume(num_messages=1, timeout=min(0.2, backoff)):
                            if msg.error() is None:
                                # A partition assigned during the wait is not paused: pause it and rewind to this
                                # message, or it would be lost (a later batch commits past it).
                                tp = TopicPartition(msg.topic(), msg.partition(), msg.offset())
                                self.consumer.pause([tp])
                                self.consumer.seek(tp)
                                paused.append(tp)
                                log.info("paused %s, assigned while retrying", where(msg))
                    else:
                        stop.wait(min(0.2, backoff))
                backoff = min(backoff * 2, self.retry_backoff_max_s)
        finally:
            if paused:
                self.consumer.resume(paused)

    def _account(self, delivery: _Delivery) -> None:
        outcome = delivery.outcome
        self.stats.batches += 1
        self.stats.classified += len(outcome.classified)
        self.stats.dead_lettered += len(outcome.dead)
        mt = self.metrics
        mt.batch_size.observe(len(outcome.classified) + len(outcome.dead))
        mt.spectra.labels("classified").inc(len(outcome.classified))
        mt.spectra.labels("dead_lettered").inc(len(outcome.dead))
        now = datetime.now(timezone.utc)
        for c in outcome.classified:
            mt.end_to_end_seconds.observe((now - c.annotation["timing"]["produced_at"]).total_seconds())
        for d in outcome.dead:
            mt.dead_letters.labels(type(d.error).__name__).inc()
        for tp in outcome.offsets:
            self.stats.committed[(tp.topic, tp.partition)] = tp.offset
            if hasattr(self.consumer, "get_watermark_offsets"):
                # cached=True: the high watermark learned from fetches, right on every broker (see brokers.md).
                high = self.consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), cached=True)[1]
                if high >= 0:
                    mt.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(high - tp.offset, 0))
        log.info("batch %d: %d classified, %d dead-lettered; committed %s", self.stats.batches,
                 len(outcome.classified), len(outcome.dead),
                 ", ".join(f"{tp.topic}[{tp.partition}]={tp.offset}" for tp in outcome.offsets))


def _summary(exc: BaseException) -> str:
    """One line about an infrastructure failure, for logs and /healthz (driver messages carry no passwords)."""
    text = str(exc.orig if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None else exc)
    line = (text.strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {line[:300]}"


def _reporter(delivery: _Delivery, failures: dict[int, KafkaError], i: int) -> Callable[[KafkaError | None, Any], None]:
    """The delivery callback of ``delivery.outgoing[i]``: a success is remembered across retries, a failure in
    ``failures`` (this round's)."""
    def on_delivery(err: KafkaError | None, _msg: Any) -> None:
        if err is None:
            delivery.delivered.add(i)
        else:
            failures[i] = err
    return on_delivery
