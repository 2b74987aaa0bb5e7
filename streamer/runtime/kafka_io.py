"""Kafka clients: the only place consumers, producers and admin clients are configured and built.

The consumer and producer settings that carry the delivery guarantee (manual commits, idempotent producer,
``acks=all``) live here, and every producer in the project (the daemon's, ``spectranet produce``, ``spectranet dlq
replay``) comes from ``make_producer``, so none of them can drift from the others.

What the clients say when the broker is not there (the front door). By default librdkafka writes every log line to
stderr, and a consumer with no broker retries about twenty times a second, each attempt an ERROR line (189 identical
lines in 15 s, with no hint which setting to change). Every client built here gets a ``KafkaWatch``:

- librdkafka's log goes through Python logging via confluent-kafka's ``logger`` hook, not stderr. Through Python
  logging it takes the daemon's format (text or JSON) and can be rate-limited (``logs.RateLimitFilter``: the same
  line at most once a minute, then with the count of repeats suppressed). The hook forwards on ``poll()``/
  ``flush()``/``consume()`` from the Python thread that calls them, never from librdkafka's own threads. Lowering
  ``log_level`` instead would hide the first occurrence too.
- ``error_cb`` turns librdkafka's error codes into one line that names what is unreachable, the setting that names it
  and what to do (``logs.Problem``), rate-limited the same way.
- The broker counts as unreachable after ``_ALL_BROKERS_DOWN`` or an authentication or TLS failure, and reachable
  again when the consumer's statistics (every ``STATS_INTERVAL_MS``) show a broker ``UP``; ``on_change`` is told
  of each change (the app clears and sets ``/readyz`` with it). librdkafka has no "connected" event, hence the
  statistics; only the consumer enables them, because only it is polled all the time (a producer's statistics
  would queue up while the daemon is idle).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from spectranet.streamer.config import KafkaSettings
from spectranet.streamer.errors import ConfigError
from spectranet.streamer.runtime.logs import REPEAT_INTERVAL_S, Problem, RateLimitFilter, normalise, setting_names

__all__ = ["consumer_config", "producer_config", "make_consumer", "make_producer", "make_admin", "ensure_topics",
           "KafkaWatch", "describe_kafka_error", "STATS_INTERVAL_MS"]

log = logging.getLogger(__name__)
librdkafka_log = logging.getLogger(f"{__name__}.librdkafka")

STATS_INTERVAL_MS = 5000  # how soon /readyz turns ready again after the broker comes back

_UNREACHABLE = {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE}
_AUTHENTICATION = {KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED}
_BROKER_PREFIX = re.compile(r"^\S+/(?:bootstrap|\d+|GroupCoordinator): ")  # "host:port/bootstrap: text" -> "text"
_DOWN = {KafkaError._ALL_BROKERS_DOWN, KafkaError._SSL, *_AUTHENTICATION}  # the broker is not usable at all


def describe_kafka_error(err: KafkaError, *, bootstrap_servers: str,
                         setting: str = setting_names("kafka.bootstrap_servers")) -> Problem | None:
    """The front-door line for a librdkafka error, or None for errors that are not about reaching the broker."""
    code = err.code()
    reason = _BROKER_PREFIX.sub("", normalise(err.str()))
    if code in _UNREACHABLE:
        return Problem(f"Kafka broker {bootstrap_servers} unreachable: {reason}", setting,
                       "start a broker there or set it; `spectranet demo` runs with an embedded one")
    if code in _AUTHENTICATION:
        return Problem(f"Kafka broker {bootstrap_servers} refused authentication: {reason}",
                       "kafka.client_properties sasl.* / KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD",
                       "check the user, password and sasl.mechanism")
    if code == KafkaError._SSL:
        return Problem(f"TLS with Kafka broker {bootstrap_servers} failed: {reason}",
                       "kafka.client_properties security.protocol, ssl.* / KAFKA_SECURITY_PROTOCOL, KAFKA_SSL_*",
                       "check ssl.ca.location and that the listener speaks the configured security.protocol")
    return None


class KafkaWatch:
    """Shared by the clients of one daemon or command: their log, their errors, and whether the broker is reachable.

    ``logger=None`` collects the problem without logging it (``spectranet check`` prints its own lines).
    """

    def __init__(self, *, bootstrap_servers: str, setting: str = setting_names("kafka.bootstrap_servers"),
                 on_change: Callable[[bool], None] | None = None, logger: logging.Logger | None = log,
                 repeat_interval_s: float = REPEAT_INTERVAL_S) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.setting = setting
        self.on_change = on_change
        self.reachable: bool | None = None  # None: not known yet
        self.problem: Problem | None = None  # the latest front-door problem, for a command's final line
        self._logger = logger
        self._limit = RateLimitFilter(repeat_interval_s)
        self._lock = threading.Lock()

    def client_config(self, *, statistics: bool = False) -> dict[str, object]:
        """The callback properties of one client (``statistics``: for the consumer only, see the module docstring)."""
        conf: dict[str, object] = {"error_cb": self.error_cb, "logger": self}
        if statistics:
            conf.update({"stats_cb": self.stats_cb, "statistics.interval.ms": STATS_INTERVAL_MS})
        return conf

    def log(self, level: int, msg: str, *args: object) -> None:
        """confluent-kafka's ``logger`` protocol: ``log(level, "%s [%s] %s", facility, client name, text)``.

        The client name is left out of the repeat key, so the consumer and the producer saying the same thing count
        as one message."""
        if self._logger is None:
            return
        key = ("librdkafka", level, normalise(" ".join(str(a) for a in (args[:1] + args[2:]))))
        suffix = self._limit.admit(key)
        if suffix is not None:
            librdkafka_log.log(level, msg + suffix.replace("%", "%%"), *args)

    def error_cb(self, err: KafkaError) -> None:
        problem = describe_kafka_error(err, bootstrap_servers=self.bootstrap_servers, setting=self.setting)
        if problem is not None:
            self.problem = problem
            self._say(logging.ERROR, ("problem", problem.fix), str(problem))  # one key per kind of problem
        elif err.fatal():
            self._say(logging.ERROR, ("fatal", err.code()), f"Kafka client fatal error: {err.str()}")
        else:
            self._say(logging.WARNING, ("error", err.code()), f"Kafka client error (librdkafka retries): {err.str()}")
        if err.code() in _DOWN:
            self._set_reachable(False)

    def stats_cb(self, stats_json: str) -> None:
        try:
            brokers = json.loads(stats_json).get("brokers", {})
        except ValueError:
            return
        if any(b.get("state") == "UP" for b in brokers.values()):
            self._set_reachable(True)

    def _set_reachable(self, reachable: bool) -> None:
        with self._lock:
            changed = reachable != self.reachable
            was_down = self.reachable is False
            self.reachable = reachable
        if not changed:
            return
        if reachable and was_down:
            self._say(logging.INFO, ("reachable",), f"Kafka broker {self.bootstrap_servers} reachable again")
        if self.on_change is not None:
            self.on_change(reachable)

    def _say(self, level: int, key: tuple[object, ...], text: str) -> None:
        if self._logger is None:
            return
        suffix = self._limit.admit(key)
        if suffix is not None:
            self._logger.log(level, "%s%s", text, suffix)


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


def _client(kafka: KafkaSettings | Mapping[str, str]) -> tuple[dict[str, str], int]:
    """(client properties, max message bytes) from the settings or from a ready client config."""
    if isinstance(kafka, KafkaSettings):
        return kafka.client_config(), kafka.max_message_bytes
    client = dict(kafka)
    if not client.get("bootstrap.servers"):
        raise ConfigError("a Kafka client config needs bootstrap.servers")
    return client, KafkaSettings.model_fields["max_message_bytes"].default


def producer_config(kafka: KafkaSettings | Mapping[str, str],
                    overrides: Mapping[str, object] | None = None) -> dict[str, object]:
    """Every producer's properties. ``kafka``: the settings, or a client config (``bootstrap.servers`` and the
    security properties, as ``KafkaSettings.client_config()`` gives); ``overrides`` win (e.g. a command's timeout)."""
    client, max_message_bytes = _client(kafka)
    return {
        **client,
        # Idempotent producer: broker-side de-duplication of retries, ordering kept per partition.
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 20,
        "compression.type": "lz4",
        "message.max.bytes": max(max_message_bytes + 65536, 1_000_000),
        **(overrides or {}),
    }


def _watch_for(client: Mapping[str, object], watch: KafkaWatch | None) -> KafkaWatch:
    return watch if watch is not None else KafkaWatch(bootstrap_servers=str(client["bootstrap.servers"]))


def make_consumer(k: KafkaSettings, *, watch: KafkaWatch | None = None) -> Consumer:
    conf = consumer_config(k)
    return Consumer({**conf, **_watch_for(conf, watch).client_config(statistics=True)})


def make_producer(kafka: KafkaSettings | Mapping[str, str], *, overrides: Mapping[str, object] | None = None,
                  watch: KafkaWatch | None = None) -> Producer:
    """The one way to build a producer (daemon, ``spectranet produce``, ``spectranet dlq replay``)."""
    conf = producer_config(kafka, overrides)
    return Producer({**conf, **_watch_for(conf, watch).client_config()})


def make_admin(kafka: KafkaSettings | Mapping[str, str], *, watch: KafkaWatch | None = None) -> AdminClient:
    client, _ = _client(kafka)
    # confluent-kafka annotates AdminClient's conf as scalars only, yet its C client takes the callbacks (error_cb,
    # logger) as Producer and Consumer do.
    return AdminClient({**client, **_watch_for(client, watch).client_config()})  # type: ignore[dict-item]


def ensure_topics(k: KafkaSettings, topics: Iterable[str], *, partitions: int = 1, timeout_s: float = 30.0) -> None:
    """Create missing topics (demo and tests; production topics are usually managed by the operator)."""
    admin = make_admin(k)
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

