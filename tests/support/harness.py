"""What the integration tests share: real packets, publishing, bounded waits, independent checks, daemons to drive.

- Packets: the 200 real spectra of ``tests/data/spectra`` (``SPECTRUM_FILES``), made into variants by suffixing the
  spectrum id (``good_packets``: 1,000 distinct spectra cost one read of 200 files), and malformed ones of each kind
  in ``MALFORMED`` (``bad_packet``).
- Observation, independent of the daemon's own bookkeeping: ``Results`` reads the database, ``Offsets`` the group's
  committed offsets against the partitions' ends, ``drain`` a topic, ``Assignments`` the partitions each daemon
  thread holds (from its log lines).
- Daemons: ``Setup`` names one test's topics, group and database and makes the daemon's settings or environment;
  ``DaemonThread`` runs ``Daemon.run`` in a thread, ``DaemonProcess`` runs ``python -m spectranet.streamer.cli run``
  for tests that must kill or signal it.

Every wait is bounded by a deadline; ``DaemonProcess.close`` always terminates its subprocess.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import fastavro
import spectranet.schemas as schemas
import sqlalchemy as sa
from confluent_kafka import Consumer, Producer, TopicPartition
from spectranet.streamer.config import Settings, load_settings
from spectranet.streamer.contract.annotate import annotation_id
from spectranet.streamer.contract.codec import Codec
from spectranet.streamer.contract.readers import read_spectrum
from spectranet.streamer.runtime import db
from spectranet.streamer.runtime.daemon import Daemon, RunStats
from spectranet.streamer.runtime.kafka_io import ensure_topics
from spectranet.streamer.science.checkpoint import load_checkpoint
from spectranet.streamer.tools.files import packet_from_file

from tests.support.common import SPECTRUM_FILES, unique_name

MODEL = ("spectranet-sedm", load_checkpoint().version)  # the shipped model
SESSION_TIMEOUT_MS = 6000
CODEC = Codec("spectrum_packet")


# --------------------------------------------------------------------------------------------------- packets


def spectrum_ids(paths: list[str]) -> set[str]:
    """The spectrum ids of the packets made from the spectrum files ``paths``."""
    return {packet_from_file(read_spectrum(p))["spectrum_id"] for p in paths}


@dataclass(frozen=True)
class Packet:
    """One message to publish, and the spectrum it must become a row for."""

    key: bytes
    value: bytes
    spectrum_id: str | None  # None for a packet that must be dead-lettered
    kind: str = "good"


@lru_cache(maxsize=1)
def base_packets() -> tuple[dict[str, Any], ...]:
    """The packets of ``SPECTRUM_FILES``, read once."""
    return tuple(packet_from_file(read_spectrum(p)) for p in SPECTRUM_FILES)


def variant(base: dict[str, Any], i: int) -> dict[str, Any]:
    """A copy of ``base`` with spectrum id ``<id>/v<i>``, produced now."""
    p = copy.deepcopy(base)
    p["spectrum_id"] = f"{base['spectrum_id']}/v{i}"
    p["produced_at"] = int(time.time() * 1000)
    return p


def good_packets(n: int) -> list[Packet]:
    """``n`` distinct spectra: variant ``i // 200`` of base spectrum ``i % 200``."""
    bases = base_packets()
    out = []
    for i in range(n):
        p = variant(bases[i % len(bases)], i // len(bases))
        out.append(Packet(p["object_id"].encode(), CODEC.encode(p), p["spectrum_id"]))
    return out


def bad_packet(kind: str, i: int) -> Packet:
    """A malformed packet of ``kind``; the expected (error class, field) are in ``MALFORMED``."""
    p = variant(base_packets()[i % len(base_packets())], 1000 + i)
    p["spectrum_id"] = f"bad/{kind}/{i}"
    key = f"bad-{kind}-{i}".encode()
    if kind == "garbage":
        return Packet(key, b"\xffnot an avro packet at all " + str(i).encode() * 8, None, kind)
    if kind == "truncated":
        good = CODEC.encode(p)
        return Packet(key, good[: len(good) // 2], None, kind)
    if kind == "schema_id":
        return Packet(key, b"\x00" + struct.pack(">I", 99) + CODEC.encode(p), None, kind)
    if kind == "length_mismatch":
        p["flux"] = p["flux"][:-3]
    elif kind == "unknown_unit":
        p["wavelength_unit"] = "notaunit"
    elif kind == "nonpositive_wavelength":
        p["wavelength"][0] = -1.0
    elif kind == "empty":
        return Packet(key, b"", None, kind)
    else:
        raise ValueError(kind)
    return Packet(key, CODEC.encode(p), None, kind)


MALFORMED = {  # kind -> (spectranet.error.class, spectranet.error.field)
    "garbage": ("DecodeError", "value"),
    "truncated": ("DecodeError", "value"),
    "schema_id": ("DecodeError", "schema_id"),
    "length_mismatch": ("ValidationError", "flux"),
    "unknown_unit": ("UnitError", "wavelength_unit"),
    "nonpositive_wavelength": ("NonPositiveWavelengthError", "wavelength"),
    "empty": ("DecodeError", "value"),
}


_MAJOR, _MINOR = schemas.SCHEMA_VERSION.split(".")
NEWER_MINOR = f"{_MAJOR}.{int(_MINOR) + 1}"  # a version no producer has written yet


def evolved_schema(extra_field: bool) -> dict[str, Any]:
    """A writer schema of the packet one minor version ahead of the current one (``NEWER_MINOR``: an extra field) or
    behind every bundled one (0.9: an optional field missing)."""
    raw = copy.deepcopy(schemas.raw_schema(schemas.SPECTRUM_PACKET))
    if extra_field:
        raw["namespace"] = f"spectranet.v{NEWER_MINOR.replace('.', '_')}"
        raw["fields"].append({"name": "airmass", "type": ["null", "double"], "default": None, "doc": "x"})
    else:
        raw["namespace"] = "spectranet.v0_9"
        raw["fields"] = [f for f in raw["fields"] if f["name"] != "exptime"]
    parsed = fastavro.parse_schema(raw)
    assert isinstance(parsed, dict)  # a record schema parses to a dict
    return parsed


def produce(bootstrap: str, topic: str, packets: list[Packet]) -> dict[tuple[int, int], Packet]:
    """Publish keyed by object id; returns (partition, offset) -> packet from the delivery reports."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 20,
                         "compression.type": "lz4"})
    placed: dict[tuple[int, int], Packet] = {}
    failed: list[str] = []

    def report(pkt: Packet) -> Callable[[Any, Any], None]:
        def on_delivery(err: Any, msg: Any) -> None:
            if err is not None:
                failed.append(str(err))
            else:
                placed[(msg.partition(), msg.offset())] = pkt
        return on_delivery

    for pkt in packets:
        producer.produce(topic, key=pkt.key, value=pkt.value, on_delivery=report(pkt))
        producer.poll(0)
    assert producer.flush(60) == 0 and not failed, failed[:3]
    assert len(placed) == len(packets)
    return placed


# --------------------------------------------------------------------------------------------------- observation


def wait_until(what: str, predicate: Callable[[], bool], *, timeout_s: float, every_s: float = 0.25) -> None:
    """Poll ``predicate`` every ``every_s`` until it holds; ``AssertionError`` naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


class Results:
    """Reads the test's database directly (never through the daemon's proxy)."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url, poolclass=sa.pool.NullPool)

    def count(self, table: sa.Table) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()

    def classification_keys(self) -> list[tuple[str, int, str, str]]:
        c = db.classifications.c
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.select(c.spectrum_id, c.revision, c.model_name,
                                                             c.model_version))]

    def assert_exactly_once(self, packets: list[Packet], model: tuple[str, str] = MODEL) -> None:
        keys = [k for k in self.classification_keys() if k[2:] == model]
        assert len(keys) == len(set(keys)), "duplicate result rows"
        assert len(keys) == len(packets)
        assert {k[0] for k in keys} == {p.spectrum_id for p in packets}
        assert self.count(db.spectra) == len(packets)

    def query(self, text: str) -> list[sa.Row[Any]]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text(text)).all())


class Offsets:
    """The group's committed offsets and the partitions' ends, read by a client that never joins the group."""

    def __init__(self, bootstrap: str, group: str, topic: str, partitions: int) -> None:
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
        self.tps = [TopicPartition(topic, p) for p in range(partitions)]

    def committed(self) -> list[int]:
        return [tp.offset for tp in self.consumer.committed(self.tps, timeout=20)]

    def ends(self) -> list[int]:
        return [self.consumer.get_watermark_offsets(tp, timeout=20)[1] for tp in self.tps]

    def at_end(self) -> bool:
        return self.committed() == self.ends()

    def close(self) -> None:
        self.consumer.close()


def drain(bootstrap: str, topic: str, n: int, *, timeout_s: float = 60.0, **conf: object) -> list[Any]:
    """Every message of ``topic`` (at least ``n``, plus any extra that shows up within 2 s), read by a new group.

    ``conf`` adds client properties (security settings, ``session.timeout.ms`` for tansu).
    """
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique_name("reader"),
                         "auto.offset.reset": "earliest", "enable.auto.commit": False, **conf})
    consumer.subscribe([topic])
    got: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < n and time.monotonic() < deadline:
            got.extend(m for m in consumer.consume(num_messages=500, timeout=1.0) if m.error() is None)
        # Anything beyond n would be a duplicate: give it a moment to show up.
        got.extend(m for m in consumer.consume(num_messages=500, timeout=2.0) if m.error() is None)
    finally:
        consumer.close()
    return got


def annotation_ids(messages: list[Any]) -> list[str]:
    codec = Codec("annotated_spectrum")
    return [codec.decode(m.value())["annotation_id"] for m in messages]


def expected_annotation_ids(packets: list[Packet]) -> set[str]:
    return {annotation_id(p.spectrum_id, 0, *MODEL) for p in packets if p.spectrum_id is not None}


# --------------------------------------------------------------------------------------------------- daemons


@dataclass
class Setup:
    """One test's topics, group and database."""

    bootstrap: str
    prefix: str
    database_url: str
    partitions: int = 1
    batch: dict[str, Any] = field(default_factory=dict)
    _readers: list[Offsets] = field(default_factory=list)

    @property
    def input_topic(self) -> str:
        return f"{self.prefix}-in"

    @property
    def output_topic(self) -> str:
        return f"{self.prefix}-out"

    @property
    def dlq_topic(self) -> str:
        return f"{self.input_topic}.dlq"

    @property
    def group(self) -> str:
        return f"{self.prefix}-g"

    def create_topics(self) -> None:
        k = self.settings().kafka
        ensure_topics(k, [self.input_topic], partitions=self.partitions)
        ensure_topics(k, [self.output_topic, self.dlq_topic])

    def settings(self, database_url: str | None = None, *, group: str | None = None,
                 model_path: Path | None = None) -> Settings:
        return load_settings(
            kafka={"bootstrap_servers": self.bootstrap, "group_id": group or self.group,
                   "input_topics": [self.input_topic], "output_topic": self.output_topic,
                   "session_timeout_ms": SESSION_TIMEOUT_MS},
            database={"url": database_url or self.database_url},
            batch={"max_packets": 20, "max_wait_s": 0.5, "retry_backoff_s": 0.2, "retry_backoff_max_s": 1.0,
                   **self.batch},
            model={"path": model_path, "device": "cpu"})

    def env(self) -> dict[str, str]:
        batch = {"max_packets": 20, "max_wait_s": 0.5, **self.batch}
        return {**os.environ,
                "SPECTRANET_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap,
                "SPECTRANET_KAFKA__GROUP_ID": self.group,
                "SPECTRANET_KAFKA__INPUT_TOPICS": f'["{self.input_topic}"]',
                "SPECTRANET_KAFKA__OUTPUT_TOPIC": self.output_topic,
                "SPECTRANET_KAFKA__SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
                "SPECTRANET_DATABASE__URL": self.database_url,
                "SPECTRANET_METRICS__PORT": "0",
                "SPECTRANET_MODEL__DEVICE": "cpu",
                **{f"SPECTRANET_BATCH__{k.upper()}": str(v) for k, v in batch.items()}}

    def offsets(self) -> Offsets:
        """A reader of the group's offsets, closed by ``close``."""
        self._readers.append(Offsets(self.bootstrap, self.group, self.input_topic, self.partitions))
        return self._readers[-1]

    def close(self) -> None:
        for reader in self._readers:
            reader.close()


class DaemonThread:
    """``Daemon.run`` in a thread of this process, stopped through its event."""

    def __init__(self, daemon: Daemon, *, name: str = "daemon", **run_kwargs: Any) -> None:
        self.daemon = daemon
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.stats: RunStats | None = None
        self.thread = threading.Thread(target=self._run, kwargs=run_kwargs, name=name, daemon=True)

    def _run(self, **kwargs: Any) -> None:
        try:
            self.stats = self.daemon.run(self.stop, **kwargs)
        except BaseException as exc:  # handed to the test, which re-raises it
            self.error = exc

    def __enter__(self) -> "DaemonThread":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the daemon did not stop within 60 s"

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError("the daemon thread failed") from self.error
        assert self.thread.is_alive(), "the daemon thread stopped on its own"

    def retries(self) -> float:
        return self.daemon.metrics.registry.get_sample_value("spectranet_infrastructure_retries_total") or 0.0


class DaemonProcess:
    """``python -m spectranet.streamer.cli run`` with its log in a file; terminated in ``close`` if still running."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "spectranet.streamer.cli", "run", *args], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, text=True)

    def log(self) -> str:
        return self.log_path.read_text()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def assigned(self) -> bool:
        return re.search(r"assigned \S+\[\d+\]", self.log()) is not None

    def stop(self, *, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait; the daemon finishes its batch, commits and exits."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def close(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        self._log.close()


class Assignments(logging.Handler):
    """Partitions held per daemon thread, from the daemon's own assign/revoke log lines.

    (Calling ``Consumer.assignment()`` from the test thread while the daemon's thread is inside ``consume`` was
    seen to hang here, so the test reads the daemon's log lines instead.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.held: dict[str, set[str]] = {}
        self._daemon_log = logging.getLogger("spectranet.streamer.runtime.daemon")

    def emit(self, record: logging.LogRecord) -> None:
        verb, _, rest = record.getMessage().partition(" ")
        parts = {p for p in rest.split(", ") if p}
        held = self.held.setdefault(record.threadName or "", set())
        if verb == "assigned":
            held |= parts
        elif verb == "revoked":
            held -= parts

    def __enter__(self) -> "Assignments":
        self._level = self._daemon_log.level
        self._daemon_log.setLevel(logging.INFO)
        self._daemon_log.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._daemon_log.removeHandler(self)
        self._daemon_log.setLevel(self._level)

    def count(self, thread: threading.Thread) -> int:
        return len(self.held.get(thread.name, ()))
