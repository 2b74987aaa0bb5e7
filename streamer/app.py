"""Wiring: build the daemon's parts from ``Settings``. The only module that knows every other one."""

from __future__ import annotations

from spectranet.streamer.config import Settings
from spectranet.streamer.contract.codec import BundledSchemas, Codec, RegistrySchemas
from spectranet.streamer.runtime import db
from spectranet.streamer.runtime.classifier import SpectrumClassifier
from spectranet.streamer.runtime.daemon import Daemon
from spectranet.streamer.runtime.kafka_io import make_consumer, make_producer
from spectranet.streamer.runtime.metrics import HealthServer, Metrics
from spectranet.streamer.science.checkpoint import load_checkpoint
from spectranet.streamer.science.inference import InferenceEngine

__all__ = ["build_daemon"]


def build_daemon(settings: Settings, *, upgrade_database: bool | None = None,
                 serve_metrics: bool | None = None, start_at_ms: int | None = None) -> Daemon:
    """``serve_metrics`` overrides ``settings.metrics.enabled`` (embedded uses start no HTTP port)."""
    k = settings.kafka
    url = settings.database.url.get_secret_value()
    if settings.database.migrate_on_start if upgrade_database is None else upgrade_database:
        db.upgrade(url)
    resolver = RegistrySchemas(k.schema_registry_url) if k.schema_registry_url else BundledSchemas()
    inference = InferenceEngine(load_checkpoint(settings.model.path), device=settings.model.device,
                             max_forward_batch=settings.model.max_forward_batch,
                             cpu_forward_batch=settings.model.cpu_forward_batch, threads=settings.model.threads)
    classifier = SpectrumClassifier(inference, codec=Codec("spectrum_packet", resolver=resolver,
                                                        max_message_bytes=k.max_message_bytes),
                                    store_raw_packets=settings.database.store_arrays)
    metrics = Metrics()
    health = None
    if settings.metrics.enabled if serve_metrics is None else serve_metrics:
        health = HealthServer(metrics, host=settings.metrics.host, port=settings.metrics.port).start()
    return Daemon(
        consumer=make_consumer(k), producer=make_producer(k), database=db.create_engine(url),
        classifier=classifier, input_topics=k.input_topics, output_topic=k.output_topic,
        dead_letter_topic=k.dead_letter_topic, output_codec=Codec("annotated_spectrum", resolver=resolver),
        output_framing=k.output_framing, max_packets=settings.batch.max_packets, max_wait_s=settings.batch.max_wait_s,
        retry_backoff_s=settings.batch.retry_backoff_s, retry_backoff_max_s=settings.batch.retry_backoff_max_s,
        metrics=metrics, health=health, pipelined=settings.batch.pipelined,
        start_at_ms=start_at_ms,
    )
