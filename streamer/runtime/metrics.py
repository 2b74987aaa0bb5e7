"""Prometheus metrics and the health endpoints, served on one HTTP port.

``/metrics`` (Prometheus text format), ``/healthz`` (liveness: the loop has turned recently *and* the stream is not
stalled) and ``/readyz`` (readiness: the model has run its warm-up batch, the consumer is subscribed, and the stream
is not stalled). Stalled means the daemon holds consumed packets and its committed offsets have not moved for
``health.stall_timeout_s`` (``Progress``): a retry loop keeps the loop turning, so turning alone proves nothing.
Both answer 503 with the reason in the body. Metric labels never carry secrets.
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

__all__ = ["Metrics", "Progress", "HealthServer"]

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Progress:
    """Whether the stream moves: when offsets were last committed, and since when consumed packets wait for it.

    Written by the daemon's loop, read by the health endpoints and two gauges (plain attribute reads and writes,
    atomic in CPython). ``stalled()`` is the truth behind ``/healthz``, ``/readyz`` and ``spectranet_stalled``.
    """

    def __init__(self, *, stall_timeout_s: float = 120.0) -> None:
        self.stall_timeout_s = stall_timeout_s
        self._last_commit = time.monotonic()
        self._waiting_since: float | None = None
        self._waiting = 0
        self.last_failure: str | None = None  # the latest infrastructure failure while retrying (no secrets in it)

    def holding(self, packets: int) -> None:
        """The daemon now holds ``packets`` consumed but uncommitted packets (0: none)."""
        if packets and self._waiting_since is None:
            self._waiting_since = time.monotonic()
        elif not packets:
            self._waiting_since = None
        self._waiting = packets

    def committed(self) -> None:
        self._last_commit = time.monotonic()
        self.last_failure = None

    def commit_age_s(self) -> float:
        return time.monotonic() - self._last_commit

    def stalled(self) -> str | None:
        """Why the stream is stalled, or None while it moves (or has nothing to do)."""
        since = self._waiting_since
        if since is None:
            return None
        stuck = time.monotonic() - max(since, self._last_commit)
        if stuck < self.stall_timeout_s:
            return None
        why = f"; retrying: {self.last_failure}" if self.last_failure else ""
        return (f"stalled: committed offsets have not moved for {stuck:.0f} s while {self._waiting} consumed packets "
                f"wait (health.stall_timeout_s = {self.stall_timeout_s:g}){why}")


class Metrics:
    """The daemon's instruments, in their own registry so tests and several daemons in one process do not collide."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.progress = Progress()
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
        self.last_commit_age = Gauge("spectranet_last_commit_age_seconds",
                                     "Seconds since offsets were last committed (grows while idle too)", registry=r)
        self.last_commit_age.set_function(lambda: self.progress.commit_age_s())
        self.stalled = Gauge("spectranet_stalled", "1 while consumed packets wait longer than health.stall_timeout_s "
                             "for a commit (what /healthz reports), else 0", registry=r)
        self.stalled.set_function(lambda: float(self.progress.stalled() is not None))


class HealthServer:
    """A tiny HTTP server thread; ``beat()`` from the loop keeps ``/healthz`` green unless ``metrics.progress`` says
    the stream is stalled."""

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
                    quiet = time.monotonic() - server._last_beat
                    stalled = server.metrics.progress.stalled()
                    if quiet >= server.stale_after_s:
                        self._reply(503, f"loop stalled: no turn for {quiet:.0f} s\n".encode())
                    elif stalled is not None:
                        self._reply(503, f"{stalled}\n".encode())
                    else:
                        self._reply(200, b"ok\n")
                elif self.path == "/readyz":
                    stalled = server.metrics.progress.stalled()
                    if not server.ready.is_set():
                        self._reply(503, b"warming up\n")
                    elif stalled is not None:
                        self._reply(503, f"{stalled}\n".encode())
                    else:
                        self._reply(200, b"ready\n")
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
