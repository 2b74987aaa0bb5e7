"""End to end through real Apache Kafka and PostgreSQL, with the daemon as it is deployed: a subprocess
``python -m spectranet.streamer.cli run`` configured by SPECTRANET_* environment variables.

Every figure is read from the output topic, which is created with ``message.timestamp.type=LogAppendTime``: the
broker stamps each annotated packet when it arrives there. A watcher thread in this process reads that topic and
decodes each annotation (spectrum id, revision, ``timing.produced_at``, ``timing.consumed_at``). Each phase
publishes its own block of revisions, so its outputs are told apart from the others'.

- sustained throughput: N packets published before the daemon starts; N / (last arrival - first ``consumed_at``)
  (start-up and model load excluded, as in bench_pipeline.py);
- latency: a producer publishes at a fixed rate, stamping ``produced_at`` when it hands the packet to the client;
  latency = arrival on the output topic - produced_at; p50 and p99;
- burst: 5,000 packets published at once into an idle, warm daemon; time from the first publish to the last arrival;
- peak RSS: VmHWM of the daemon process, read from /proc every 0.5 s until it exits;
- scaling: k daemons in one group over an 8-partition topic; the group is stable before N packets are published.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common import ROOT, load, percentile
from confluent_kafka import OFFSET_BEGINNING, Consumer, ConsumerGroupState, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from spectranet.streamer.contract.codec import Codec
from spectranet.streamer.runtime import db

RESULTS = ROOT / "bench" / "results"


def create_topics(bootstrap: str, *, inputs: str, partitions: int, output: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    new = [NewTopic(inputs, num_partitions=partitions, replication_factor=1),
           NewTopic(output, num_partitions=1, replication_factor=1,
                    config={"message.timestamp.type": "LogAppendTime"}),
           NewTopic(f"{inputs}.dlq", num_partitions=1, replication_factor=1)]
    for future in admin.create_topics(new, operation_timeout=30).values():
        future.result(30)


class OutputWatcher:
    """Reads the output topic from the beginning; one record per (spectrum id, revision), the first arrival."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.codec = Codec("annotated_spectrum")
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"watch-{uuid.uuid4().hex[:8]}",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": 50})
        self.consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        self.records: dict[tuple[str, int], dict[str, float]] = {}
        self.duplicates = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for msg in self.consumer.consume(num_messages=500, timeout=0.2):
                if msg.error():
                    continue
                a = self.codec.decode(msg.value())
                key = (a["spectrum_id"], a["revision"])
                t = a["timing"]
                rec = {"revision": a["revision"], "arrived": msg.timestamp()[1] / 1000,
                       "produced_at": t["produced_at"].timestamp(), "consumed_at": t["consumed_at"].timestamp(),
                       "classified_at": t["classified_at"].timestamp()}
                with self._lock:
                    if key in self.records:
                        self.duplicates += 1
                    else:
                        self.records[key] = rec

    def block(self, revisions: range) -> list[dict[str, float]]:
        with self._lock:
            return [r for r in self.records.values() if r["revision"] in revisions]

    def wait_for(self, revisions: range, n: int, timeout_s: float) -> list[dict[str, float]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.block(revisions)
            if len(got) >= n:
                return got
            time.sleep(0.2)
        got = self.block(revisions)
        print(f"  ! timed out: {len(got)} of {n} outputs", flush=True)
        return got

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.consumer.close()


class DaemonProcess:
    """``python -m spectranet.streamer.cli run`` as a subprocess; its peak RSS is sampled from /proc until it exits."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "spectranet.streamer.cli", "run", "--idle-timeout", "900"],
                                     cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.peak_kb = 0
        self._terminated = False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _sample(self) -> None:
        status = Path(f"/proc/{self.proc.pid}/status")
        while self.proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_kb = max(self.peak_kb, int(line.split()[1]))
            except (OSError, ValueError):
                pass
            time.sleep(0.5)

    def terminate(self) -> None:
        """One SIGTERM only: a second one during interpreter shutdown would kill it with the default action."""
        if self.proc.poll() is None and not self._terminated:
            self._terminated = True
            self.proc.send_signal(signal.SIGTERM)  # finishes the batch in hand, commits, closes

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, wait; killed (exit code -9) if it has not exited after ``timeout_s``."""
        self.terminate()
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._thread.join(2)
        self.log.close()
        return rc


def daemon_env(*, bootstrap: str, group: str, topic: str, output: str, database_url: str,
               threads: int | None) -> dict[str, str]:
    """The daemon's environment; ``threads`` pins torch (and OpenMP/MKL) to that many threads, None leaves torch's
    default (one per core), as a deployment that does not set ``model.threads`` gets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPECTRANET_", "KAFKA_"))}
    env.update({
        "SPECTRANET_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "SPECTRANET_KAFKA__GROUP_ID": group,
        "SPECTRANET_KAFKA__INPUT_TOPICS": json.dumps([topic]), "SPECTRANET_KAFKA__OUTPUT_TOPIC": output,
        "SPECTRANET_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "SPECTRANET_DATABASE__URL": database_url, "SPECTRANET_DATABASE__MIGRATE_ON_START": "false",
        "SPECTRANET_METRICS__PORT": "0", "SPECTRANET_MODEL__DEVICE": "cpu",
    })
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(var, None)
        if threads is not None:
            env[var] = str(threads)
    return env


def wait_group(bootstrap: str, group: str, members: int, timeout_s: float = 180.0) -> float:
    """Seconds until ``group`` is Stable with ``members`` members."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            g = admin.describe_consumer_groups([group])[group].result(10)
            if g.state == ConsumerGroupState.STABLE and len(g.members) == members:
                return time.monotonic() - start
        except Exception:  # noqa: BLE001 - the group does not exist until the first member joins
            pass
        time.sleep(0.5)
    raise TimeoutError(f"group {group} not stable with {members} members after {timeout_s} s")


class Publisher:
    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.codec = Codec("spectrum_packet")
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "compression.type": "lz4"})

    def burst(self, items: list[dict[str, Any]]) -> float:
        """Encode first, then publish as fast as the client goes; returns the wall time of the first publish."""
        now_ms = int(time.time() * 1000)
        encoded = [(p["object_id"].encode(), self.codec.encode(dict(p, produced_at=now_ms))) for p in items]
        t0 = time.time()
        for key, value in encoded:
            self.producer.produce(self.topic, key=key, value=value)
            self.producer.poll(0)
        assert self.producer.flush(60) == 0
        return t0

    def paced(self, items: Iterable[dict[str, Any]], rate: float) -> float:
        """One packet every 1/rate s, ``produced_at`` stamped at hand-over; returns the achieved rate."""
        start = time.time()
        n = 0
        for i, p in enumerate(items):
            delay = start + i / rate - time.time()
            if delay > 0:
                time.sleep(delay)
            self.producer.produce(self.topic, key=p["object_id"].encode(),
                                  value=self.codec.encode(dict(p, produced_at=int(time.time() * 1000))))
            self.producer.poll(0)
            n += 1
        assert self.producer.flush(60) == 0
        return n / (time.time() - start)


class Blocks:
    """Hands out packets in blocks of distinct revisions (200 real spectra per revision)."""

    def __init__(self, base: list[dict[str, Any]]) -> None:
        self.base, self.next_revision = base, 0

    def take(self, n: int) -> tuple[list[dict[str, Any]], range]:
        per = len(self.base)
        first = self.next_revision
        self.next_revision += -(-n // per)
        items = [dict(self.base[i % per], revision=first + i // per) for i in range(n)]
        return items, range(first, self.next_revision)


def _latency_stats(recs: list[dict[str, float]]) -> dict[str, float]:
    """Latency percentiles, and the median of its three parts: waiting in Kafka and for the micro-batch to close
    (produced_at -> consumed_at), decode + prepare + infer (-> classified_at, stamped after inference),
    inference + annotate + write + publish + arrival (-> arrived)."""
    lat = [r["arrived"] - r["produced_at"] for r in recs]
    parts = {"wait_p50_s": [r["consumed_at"] - r["produced_at"] for r in recs],
             "prepare_p50_s": [r["classified_at"] - r["consumed_at"] for r in recs],
             "infer_deliver_p50_s": [r["arrived"] - r["classified_at"] for r in recs]}
    return {"n": len(lat), "p50_s": round(percentile(lat, 50), 3), "p99_s": round(percentile(lat, 99), 3),
            "max_s": round(max(lat), 3) if lat else float("nan"),
            **{k: round(percentile(v, 50), 3) for k, v in parts.items()}}


def _flush_line() -> int:
    """The line of the delivery thread's ``producer.flush`` in streamer/runtime/daemon.py (py-spy names the caller's
    line)."""
    for i, line in enumerate((ROOT / "streamer" / "runtime" / "daemon.py").read_text().splitlines(), 1):
        if "remaining = self.producer.flush(" in line:
            return i
    return -1


def profile(pid: int, seconds: int, out: Path) -> dict[str, Any]:
    """py-spy (raw collapsed stacks, non-blocking) of the daemon for ``seconds``; top functions by self time."""
    cmd = ["py-spy", "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "50", "--nonblocking",
           "--format", "raw", "--output", str(out)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}
    if r.returncode != 0 or not out.exists():
        return {"error": (r.stderr or r.stdout)[-500:]}
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        total += c
        frames = stack.split(";")
        self_t[frames[-1]] = self_t.get(frames[-1], 0) + c
        for f in set(frames):
            incl[f] = incl.get(f, 0) + c
    stages = {"poll (consumer.consume)": "Daemon._poll", "execute (decode..classify)": "SpectrumClassifier.execute",
              "  decode": "Codec.decode", "  validate + prepare": "prepare_packet",
              "  inference (engine._run)": "InferenceEngine._run", "  model forward": "SpectraNet.forward",
              "  annotate": "build_annotation", "write + publish (delivery thread)": "Daemon._write_and_publish",
              "  db.write_batch": "write_batch", "  encode output": "Codec.encode",
              "  producer.flush (on CPU)":
                  f"Daemon._write_and_publish (streamer/runtime/daemon.py:{_flush_line()})",
              "commit": "Daemon._commit"}
    stage_share = {label: 0 for label in stages}
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        for label, needle in stages.items():
            if needle in stack:
                stage_share[label] += int(count)

    def top(d: dict[str, int]) -> list[dict[str, Any]]:
        return [{"frame": f, "share": round(v / total, 3)} for f, v in sorted(d.items(), key=lambda kv: -kv[1])[:25]]

    return {"samples": total, "file": str(out.relative_to(ROOT)), "top_self": top(self_t), "top_inclusive": top(incl),
            "stages": {k: round(v / total, 3) for k, v in stage_share.items()}}


def single_daemon(*, bootstrap: str, pg_dsn: str, create_database: Any, base: list[dict[str, Any]], quick: bool,
                  threads: int) -> dict[str, Any]:
    """One daemon: drain, latency at 10/s, 50/s and the max sustainable rate, a 5,000 burst, a profile, peak RSS."""
    n_drain = 300 if quick else 2000
    duration = 3 if quick else 20
    n_burst = 500 if quick else 5000
    name = f"e2e_{uuid.uuid4().hex[:8]}"
    topic, output = f"{name}-in", f"{name}-out"
    url = create_database(pg_dsn, name)
    db.upgrade(url)
    create_topics(bootstrap, inputs=topic, partitions=3, output=output)
    blocks = Blocks(base)
    pub = Publisher(bootstrap, topic)
    watcher = OutputWatcher(bootstrap, output)
    res: dict[str, Any] = {"topic": topic, "partitions": 3, "database_url": url,
                           "config": "defaults (batch.max_packets 64, batch.max_wait_s 1.0, pipelined)"}
    drain_items, drain_revs = blocks.take(n_drain)
    pub.burst(drain_items)
    res["drain_revisions"] = [drain_revs.start, drain_revs.stop]
    proc = DaemonProcess(daemon_env(bootstrap=bootstrap, group=name, topic=topic, output=output, database_url=url,
                                    threads=threads), RESULTS / "daemon-single.log")
    t_start = time.time()
    try:
        recs = watcher.wait_for(drain_revs, n_drain, 300)
        first = min(r["consumed_at"] for r in recs)
        last = max(r["arrived"] for r in recs)
        res["sustained"] = {"n": len(recs), "seconds": round(last - first, 2),
                            "spectra_per_s": round(len(recs) / (last - first), 1),
                            "startup_s": round(first - t_start, 1), "load_average": load()}
        print("sustained", res["sustained"], flush=True)
        max_rate = round(0.9 * res["sustained"]["spectra_per_s"])
        res["latency"] = []
        max_label = f"max sustainable ({max_rate}/s = 0.9 x sustained)"
        for label, rate in (("10/s", 10), ("50/s", 50), (max_label, max_rate)):
            items, revs = blocks.take(int(rate * duration))
            achieved = pub.paced(items, rate)
            recs = watcher.wait_for(revs, len(items), 120 + len(items) / 10)
            row = {"rate": label, "target_per_s": rate, "published_per_s": round(achieved, 1),
                   **_latency_stats(recs), "load_average": load()}
            res["latency"].append(row)
            print("latency", row, flush=True)
            time.sleep(2)
        items, revs = blocks.take(n_burst)
        t0 = pub.burst(items)
        published = time.time() - t0
        recs = watcher.wait_for(revs, n_burst, 600)
        last = max(r["arrived"] for r in recs)
        res["burst"] = {"n": len(recs), "publish_s": round(published, 2), "absorbed_s": round(last - t0, 1),
                        "spectra_per_s": round(len(recs) / (last - t0), 1), **_latency_stats(recs),
                        "load_average": load()}
        print("burst", res["burst"], flush=True)
        # a profile of the daemon draining a backlog (a phase of its own, so it perturbs no figure above)
        items, revs = blocks.take(300 if quick else 1200)
        pub.burst(items)
        res["profile"] = profile(proc.pid, 4 if quick else 15, RESULTS / "profile-daemon.txt")
        watcher.wait_for(revs, len(items), 300)
    finally:
        rc = proc.stop()
        watcher.close()
    res["daemon_exit_code"] = rc
    res["peak_rss_mb"] = round(proc.peak_kb / 1024, 1)
    res["duplicates"] = watcher.duplicates
    return res


def scaling(*, bootstrap: str, pg_dsn: str, create_database: Any, base: list[dict[str, Any]], quick: bool,
            threads: int, counts: tuple[int, ...] = (1, 2, 4)) -> list[dict[str, Any]]:
    n = 300 if quick else 2000
    rows: list[dict[str, Any]] = []
    for k in counts:
        name = f"scale{k}_{uuid.uuid4().hex[:8]}"
        topic, output = f"{name}-in", f"{name}-out"
        url = create_database(pg_dsn, name)
        db.upgrade(url)
        create_topics(bootstrap, inputs=topic, partitions=8, output=output)
        watcher = OutputWatcher(bootstrap, output)
        env = daemon_env(bootstrap=bootstrap, group=name, topic=topic, output=output, database_url=url, threads=threads)
        procs = [DaemonProcess(env, RESULTS / f"daemon-scale{k}-{i}.log") for i in range(k)]
        try:
            join_s = wait_group(bootstrap, name, k)
            time.sleep(1.0)
            items, revs = Blocks(base).take(n)
            t0 = Publisher(bootstrap, topic).burst(items)
            recs = watcher.wait_for(revs, n, 600)
            last = max(r["arrived"] for r in recs)
            row = {"daemons": k, "partitions": 8, "n": len(recs), "seconds": round(last - t0, 2),
                   "spectra_per_s": round(len(recs) / (last - t0), 1), "group_stable_after_s": round(join_s, 1),
                   "load_average": load()}
        finally:
            for p in procs:  # all at once: one rebalance, not k-1 of them
                p.terminate()
            codes = [p.stop() for p in procs]
            watcher.close()
        row["peak_rss_mb_per_daemon"] = [round(p.peak_kb / 1024, 1) for p in procs]
        row["exit_codes"] = codes
        rows.append(row)
        print("scaling", row, flush=True)
    base_rate = rows[0]["spectra_per_s"]
    for r in rows:
        r["speedup_vs_1"] = round(r["spectra_per_s"] / base_rate, 2)
    return rows
