"""Prometheus metrics and the health endpoints, served on one HTTP port.

``/metrics`` (Prometheus text format), ``/healthz`` (the loop has turned recently: liveness) and ``/readyz`` (the
model has run its warm-up batch and the consumer is subscribed: readiness). Metric labels never carry secrets.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["Metrics", "HealthServer"]

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    """The daemon's instruments, in their own registry so tests and several daemons in one process do not collide."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.spectra = Counter("spectranet_spectra", "Spectrum packets committed, by outcome", ["outcome"], registry=r)
        self.dead_letters = Counter("spectranet_dead_letters", "Dead-lettered packets by error class", ["reason"],
                                    registry=r)
        self.batch_size = Histogram("spectranet_batch_size", "Packets per micro-batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.stage_seconds = Histogram("spectranet_stage_seconds", "Wall time per batch and stage", ["stage"],
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.end_to_end_seconds = Histogram("spectranet_end_to_end_seconds",
                                            "From the packet's produced_at to its commit", buckets=_LATENCY_BUCKETS,
                                            registry=r)
        self.consumer_lag = Gauge("spectranet_consumer_lag", "High watermark minus committed offset",
                                  ["topic", "partition"], registry=r)
        self.infrastructure_retries = Counter("spectranet_infrastructure_retries",
                                              "Batches retried after a broker or database failure", registry=r)
        self.model_info = Gauge("spectranet_model_info", "The loaded model (value 1)",
                                ["name", "version", "weights_sha256", "device"], registry=r)


class HealthServer:
    """A tiny HTTP server thread; ``beat()`` from the loop keeps ``/healthz`` green."""

    def __init__(self, metrics: Metrics, *, host: str = "0.0.0.0", port: int = 9108, stale_after_s: float = 120.0):
        self.metrics = metrics
        self.ready = threading.Event()
        self.stale_after_s = stale_after_s
        self._last_beat = time.monotonic()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path == "/metrics":
                    self._reply(200, generate_latest(server.metrics.registry), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    alive = time.monotonic() - server._last_beat < server.stale_after_s
                    self._reply(200 if alive else 503, b"ok\n" if alive else b"loop stalled\n")
                elif self.path == "/readyz":
                    ok = server.ready.is_set()
                    self._reply(200 if ok else 503, b"ready\n" if ok else b"warming up\n")
                else:
                    self._reply(404, b"not found\n")

            def _reply(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # scrapes are not news
                pass

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="health-http", daemon=True)

    def start(self) -> "HealthServer":
        self._thread.start()
        return self

    def beat(self) -> None:
        self._last_beat = time.monotonic()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
