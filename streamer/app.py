"""Wiring: build the daemon's parts from ``Settings``. The only module that knows every other one.

The front door starts here: the database is tried first, so a missing server or a wrong password is one line naming
``database.url`` (``InfrastructureError``, printed by the CLI) before any client exists. The health server, consumer
and producer are then built inside a ``try`` that closes whatever was already built if a later step fails; once the
``Daemon`` is returned it owns them and closes them when ``run`` ends (``close_daemon`` for a daemon whose ``run``
failed before it started). The clients share one ``KafkaWatch``, which clears ``/readyz`` while the broker is
unreachable and sets it again when the broker is back (``runtime/kafka_io.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import ExitStack

from confluent_kafka import Consumer, Producer
from spectranet.streamer.config import DatabaseSettings, ModelSettings, Settings
from spectranet.streamer.contract.annotate import check_template_bank
from spectranet.streamer.contract.codec import BundledSchemas, Codec, RegistrySchemas
from spectranet.streamer.errors import CheckpointError, ConfigError, InfrastructureError
from spectranet.streamer.runtime import db
from spectranet.streamer.runtime.classifier import SpectrumClassifier
from spectranet.streamer.runtime.daemon import Daemon
from spectranet.streamer.runtime.kafka_io import KafkaWatch, make_consumer, make_producer
from spectranet.streamer.runtime.logs import Problem, describe_database_error, setting_names
from spectranet.streamer.runtime.metrics import HealthServer, Metrics
from spectranet.streamer.science.checkpoint import load_checkpoint
from spectranet.streamer.science.inference import InferenceEngine, resolve_template_bank
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

__all__ = ["build_daemon", "close_daemon", "open_database", "readiness_follows_broker", "build_inference"]


def open_database(settings: DatabaseSettings) -> Engine:
    """An engine whose first connection has succeeded; otherwise ``InfrastructureError`` with the front-door line."""
    url = settings.url.get_secret_value()
    engine = db.create_engine(url)
    try:
        with engine.connect():
            pass
    except DBAPIError as exc:
        engine.dispose()
        problem = describe_database_error(exc, url, from_file=settings.url_file is not None)
        raise InfrastructureError(str(problem)) from exc
    return engine


def _upgrade(settings: DatabaseSettings) -> None:
    url = settings.url.get_secret_value()
    try:
        db.upgrade(url)
    except DBAPIError as exc:
        if getattr(getattr(exc, "orig", None), "sqlstate", None) == "42501":  # insufficient_privilege
            raise InfrastructureError(str(Problem(
                "the database role may not run migrations", setting_names("database.migrate_on_start"),
                "run `spectranet db upgrade` as the owner and set it to false"))) from exc
        raise InfrastructureError(str(describe_database_error(exc, url,
                                                              from_file=settings.url_file is not None))) from exc


def readiness_follows_broker(health: HealthServer) -> Callable[[bool], None]:
    """``KafkaWatch.on_change`` that clears ``/readyz`` while the broker is unreachable and sets it again after, but
    only if it was ready before (the daemon itself sets it once the model is warm and the consumer subscribed)."""
    lock = threading.Lock()
    cleared_by_us = False

    def on_change(reachable: bool) -> None:
        nonlocal cleared_by_us
        with lock:
            if not reachable and health.ready.is_set():
                health.ready.clear()
                cleared_by_us = True
            elif reachable and cleared_by_us:
                health.ready.set()
                cleared_by_us = False

    return on_change


def _start_health(settings: Settings, metrics: Metrics) -> HealthServer:
    m = settings.metrics
    try:
        return HealthServer(metrics, host=m.host, port=m.port).start()
    except OSError as exc:
        raise InfrastructureError(str(Problem(f"cannot serve /metrics on {m.host}:{m.port}: {exc.strerror}",
                                              f"{setting_names('metrics.port')}, {setting_names('metrics.host')}",
                                              "choose a free port, or set metrics.enabled = false"))) from exc


def build_inference(settings: ModelSettings) -> InferenceEngine:
    """The model and, unless ``model.templates`` is "none", the template bank that refines its redshifts: each read
    once, here; a bank that cannot be read or does not fit the model is one line naming ``model.templates``."""
    checkpoint = load_checkpoint(settings.path)
    try:
        templates = resolve_template_bank(settings.templates, checkpoint)
        if templates is not None:
            check_template_bank(templates)
    except (CheckpointError, ConfigError) as exc:
        raise ConfigError(str(Problem(str(exc), setting_names("model.templates"),
                                      'give a bank that fits the model, "" for the shipped one, or "none"'))) from exc
    return InferenceEngine(checkpoint, device=settings.device, max_forward_batch=settings.max_forward_batch,
                           cpu_forward_batch=settings.cpu_forward_batch, threads=settings.threads, templates=templates,
                           precision=settings.precision)


def build_daemon(settings: Settings, *, upgrade_database: bool | None = None,
                 serve_metrics: bool | None = None, start_at_ms: int | None = None) -> Daemon:
    """``serve_metrics`` overrides ``settings.metrics.enabled`` (embedded uses start no HTTP port)."""
    k = settings.kafka
    database = open_database(settings.database)
    health: HealthServer | None = None
    consumer: Consumer | None = None
    producer: Producer | None = None
    try:
        if settings.database.migrate_on_start if upgrade_database is None else upgrade_database:
            _upgrade(settings.database)
        resolver = RegistrySchemas(k.schema_registry_url) if k.schema_registry_url else BundledSchemas()
        inference = build_inference(settings.model)
        classifier = SpectrumClassifier(inference, codec=Codec("spectrum_packet", resolver=resolver,
                                                               max_message_bytes=k.max_message_bytes),
                                        store_raw_packets=settings.database.store_arrays)
        metrics = Metrics()
        if settings.metrics.enabled if serve_metrics is None else serve_metrics:
            health = _start_health(settings, metrics)
        watch = KafkaWatch(bootstrap_servers=k.bootstrap_servers,
                           on_change=readiness_follows_broker(health) if health is not None else None)
        consumer = make_consumer(k, watch=watch)
        producer = make_producer(k, watch=watch)
        return Daemon(
            consumer=consumer, producer=producer, database=database,
            classifier=classifier, input_topics=k.input_topics, output_topic=k.output_topic,
            dead_letter_topic=k.dead_letter_topic, output_codec=Codec("annotated_spectrum", resolver=resolver),
            output_framing=k.output_framing, max_packets=settings.batch.max_packets,
            max_wait_s=settings.batch.max_wait_s, retry_backoff_s=settings.batch.retry_backoff_s,
            retry_backoff_max_s=settings.batch.retry_backoff_max_s, metrics=metrics, health=health,
            pipelined=settings.batch.pipelined, start_at_ms=start_at_ms,
            dead_letter_max_bytes=k.max_message_bytes, stall_timeout_s=settings.health.stall_timeout_s,
        )
    except BaseException:
        _close(consumer=consumer, producer=producer, health=health, database=database)
        raise


def close_daemon(daemon: Daemon) -> None:
    """Close a daemon's clients when its ``run`` failed before reaching its own ``finally`` (e.g. the database
    refused the model registration); harmless after ``run`` closed them itself."""
    _close(consumer=daemon.consumer, producer=daemon.producer, health=daemon.health, database=daemon.database)


def _close(*, consumer: Consumer | None, producer: Producer | None, health: HealthServer | None,
           database: Engine) -> None:
    """Close what exists; every step runs even if an earlier one raises (then the first error is re-raised)."""
    with ExitStack() as stack:  # last in, first out: health, producer, consumer, then the database
        stack.callback(database.dispose)
        if consumer is not None:
            stack.callback(_close_consumer, consumer)
        if producer is not None:
            # Nothing a caller waits for is in it; purge so that closing does not wait on an absent broker.
            stack.callback(producer.flush, 0)
            stack.callback(producer.purge)
        if health is not None:
            stack.callback(health.stop)


def _close_consumer(consumer: Consumer) -> None:
    try:
        consumer.close()
    except RuntimeError:  # already closed by Daemon.run
        pass
