"""The consumer loop: poll -> decode -> validate -> preprocess -> classify -> write -> publish -> commit.

Two threads: the main thread polls, classifies and commits; a delivery thread writes the database and publishes,
so batch N's I/O overlaps batch N+1's inference. Commits stay in order on the main thread, and at most one batch
is ever delivered but uncommitted.

Delivery guarantee: at-least-once with idempotent effects. A batch's offsets are committed (synchronously) only after
its database transaction has committed *and* every annotated packet and dead letter has a successful delivery report.
If the process dies in between, the batch is consumed again; the database ignores rows it already has (unique per
spectrum, revision and model) and annotated packets carry a deterministic ``annotation_id`` so subscribers can
de-duplicate. A packet that cannot be used is dead-lettered (topic and table) with the reason and never blocks its
batch; a broker or database failure is retried with backoff and is never dead-lettered or committed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from confluent_kafka import OFFSET_END, KafkaError, KafkaException, TopicPartition
from spectranet.streamer.contract.codec import Codec, Framing
from spectranet.streamer.errors import InfrastructureError
from spectranet.streamer.runtime import db
from spectranet.streamer.runtime.classifier import BatchOutcome, Message, SpectrumClassifier, where
from spectranet.streamer.runtime.metrics import HealthServer, Metrics
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

__all__ = ["Daemon", "RunStats"]

log = logging.getLogger(__name__)


@dataclass
class RunStats:
    batches: int = 0
    classified: int = 0
    dead_lettered: int = 0
    committed: dict[tuple[str, int], int] = field(default_factory=dict)

    @property
    def messages(self) -> int:
        return self.classified + self.dead_lettered


class Daemon:
    """Owns the clients; runs ``SpectrumClassifier`` over micro-batches and enforces the delivery guarantee."""

    def __init__(self, *, consumer: Any, producer: Any, database: Engine, classifier: SpectrumClassifier,
                 input_topics: Sequence[str], output_topic: str, dead_letter_topic: str, output_codec: Codec,
                 output_framing: Framing = "schemaless", max_packets: int = 64, max_wait_s: float = 1.0,
                 retry_backoff_s: float = 1.0, retry_backoff_max_s: float = 30.0,
                 delivery_timeout_s: float = 60.0, metrics: Metrics | None = None,
                 health: HealthServer | None = None, pipelined: bool = True,
                 start_at_ms: int | None = None) -> None:
        self.consumer, self.producer, self.database = consumer, producer, database
        self.classifier = classifier
        self.input_topics = list(input_topics)
        self.output_topic, self.dead_letter_topic = output_topic, dead_letter_topic
        self.output_codec, self.output_framing = output_codec, output_framing
        self.max_packets, self.max_wait_s = max_packets, max_wait_s
        self.retry_backoff_s, self.retry_backoff_max_s = retry_backoff_s, retry_backoff_max_s
        self.delivery_timeout_s = delivery_timeout_s
        self.metrics = metrics or Metrics()
        self.health = health
        self.stats = RunStats()
        self._revoked: set[tuple[str, int]] = set()
        self.pipelined = pipelined
        self.start_at_ms = start_at_ms  # replay: newly assigned partitions start at this time, not at commits
        self._delivery = ThreadPoolExecutor(max_workers=1, thread_name_prefix="delivery")
        self._inflight: tuple[BatchOutcome, Future[None] | None] | None = None

    def run(self, stop: threading.Event | None = None, *, max_messages: int | None = None,
            idle_timeout_s: float | None = None) -> RunStats:
        """Run until ``stop`` is set, ``max_messages`` are committed, or nothing arrives for ``idle_timeout_s``.

        Pipelined: while batch N is written and published on the delivery thread, batch N+1 is polled, decoded,
        preprocessed and classified here; N is committed (here, in order) before N+1's delivery starts, so at most
        one batch is ever uncommitted. ``stop`` (SIGTERM/SIGINT) is honoured between batches: the batch in flight
        is finished and committed, unless its delivery keeps failing, in which case it is left for redelivery.
        """
        stop = stop or threading.Event()
        m = self.classifier.model
        db.register_model(self.database, name=m.name, version=m.version, weights_sha256=m.weights_sha256,
                          taxonomy=m.taxonomy, model_metadata=m.card())
        self.metrics.model_info.labels(m.name, m.version, m.weights_sha256,
                                       str(self.classifier.engine.device)).set(1)
        self.consumer.subscribe(self.input_topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_revoke)
        if self.health is not None:
            self.health.ready.set()  # the engine has run its warm-up batch; the consumer is subscribed
        last_message = time.monotonic()
        try:
            while not stop.is_set():
                if self.health is not None:
                    self.health.beat()
                messages = self._poll()                                           # consume
                outcome = None
                if messages:
                    last_message = time.monotonic()
                    with self.metrics.stage_seconds.labels("execute").time():      # decode .. classify
                        outcome = self.classifier.execute(messages, consumed_at=datetime.now(timezone.utc))
                if self._inflight is not None and not self._finish(stop):          # commit the previous batch
                    break
                if max_messages is not None and self.stats.messages >= max_messages:
                    break
                if outcome is None:
                    if idle_timeout_s is not None and time.monotonic() - last_message > idle_timeout_s:
                        break
                    continue
                if self.pipelined:                                                 # write, publish (background)
                    self._inflight = (outcome, self._delivery.submit(self._write_and_publish, outcome))
                else:
                    self._inflight = (outcome, None)
                    if not self._finish(stop):
                        break
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

    def _finish(self, stop: threading.Event) -> bool:
        """Wait for the batch in flight, retrying its delivery if it failed, then commit it. False: gave up on stop."""
        assert self._inflight is not None
        outcome, future = self._inflight
        self._inflight = None  # a revocation during retries must not try to settle it again
        failed = future is None
        if future is not None:
            try:
                future.result()
            except (InfrastructureError, DBAPIError, KafkaException) as exc:
                self.metrics.infrastructure_retries.inc()  # retried below; counted even if that retry succeeds
                log.error("delivery failed, retrying (nothing committed): %s", exc)
                failed = True

        def deliver() -> None:
            if failed:
                self._write_and_publish(outcome)
            self._commit(outcome)

        if not self._with_retries(deliver, stop):
            return False
        self._account(outcome)
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
            outcome, future = self._inflight
            try:
                if future is not None:
                    future.result(timeout=self.delivery_timeout_s)
                    self._inflight = None
                    self._commit(outcome)
                    self._account(outcome)
            except Exception as exc:  # noqa: BLE001 - the main loop retries it; here we only must not commit
                log.warning("batch in flight not committed before revocation (%s); it will be redelivered", exc)
        self._revoked |= {(tp.topic, tp.partition) for tp in partitions}
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

    def _write_and_publish(self, outcome: BatchOutcome) -> None:
        """Database transaction, then produce and wait for every delivery report; raises on any failure.

        Runs on the delivery thread (the producer and the engine's pool are thread-safe; the consumer is not used).
        """
        with self.metrics.stage_seconds.labels("write").time():
            db.write_batch(self.database, [c.rows for c in outcome.classified], [d.row() for d in outcome.dead])
        failures: list[str] = []

        def on_delivery(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                failures.append(str(err))

        with self.metrics.stage_seconds.labels("publish").time():
            for c in outcome.classified:
                self.producer.produce(self.output_topic, key=c.key, on_delivery=on_delivery,
                                      value=self.output_codec.encode(c.annotation, framing=self.output_framing))
            for d in outcome.dead:
                self.producer.produce(self.dead_letter_topic, key=d.key, value=d.payload,
                                      headers=d.kafka_headers(), on_delivery=on_delivery)
            remaining = self.producer.flush(self.delivery_timeout_s)
        if remaining or failures:
            raise InfrastructureError(f"{remaining} messages undelivered, {len(failures)} failed: {failures[:3]}")

    def _commit(self, outcome: BatchOutcome) -> None:
        """Synchronous commit of the batch's offsets, except partitions revoked meanwhile (their new owner
        reprocesses them; the effects are idempotent)."""
        offsets = [tp for tp in outcome.offsets if (tp.topic, tp.partition) not in self._revoked]
        if len(offsets) < len(outcome.offsets):
            log.warning("not committing revoked partitions; their new owner reprocesses them idempotently")
        if offsets:
            with self.metrics.stage_seconds.labels("commit").time():
                self.consumer.commit(offsets=offsets, asynchronous=False)

    def _with_retries(self, action: Callable[[], None], stop: threading.Event) -> bool:
        """Retry infrastructure failures with backoff; partitions are paused meanwhile so the group keeps us."""
        backoff = self.retry_backoff_s
        paused: list[TopicPartition] = []
        try:
            while True:
                try:
                    action()
                    return True
                except (InfrastructureError, DBAPIError, KafkaException) as exc:
                    self.metrics.infrastructure_retries.inc()
                    log.error("infrastructure failure, retrying in %.1f s (nothing committed): %s", backoff, exc)
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

    def _account(self, outcome: BatchOutcome) -> None:
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
