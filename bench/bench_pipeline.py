"""End-to-end daemon throughput through real Apache Kafka and PostgreSQL: the skeleton's loop vs the optimised one.

    python bench/bench_pipeline.py [--packets 2000] [--batch 64] [--out bench/results/pipeline.json]

Starts the same services as the integration tests (tests/support/), publishes N real spectra (the 200 test
fixtures, each with several revisions), and times each daemon mode from its first poll to its last commit, the model
already warm. Each mode gets its own topic, group and database, so both start cold on the same broker.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from confluent_kafka import Producer  # noqa: E402
from spectranet.streamer.app import build_daemon  # noqa: E402
from spectranet.streamer.config import load_settings  # noqa: E402
from spectranet.streamer.contract.codec import Codec  # noqa: E402
from spectranet.streamer.contract.readers import read_spectrum  # noqa: E402
from spectranet.streamer.runtime.kafka_io import ensure_topics  # noqa: E402
from spectranet.streamer.tools.files import packet_from_file  # noqa: E402

from tests.support.common import unique_name  # noqa: E402
from tests.support.kafka import KafkaService, start_kafka  # noqa: E402
from tests.support.postgres import PostgresService, create_database, start_postgres  # noqa: E402


def packets(n: int) -> list[dict]:
    base = [packet_from_file(read_spectrum(p)) for p in sorted((ROOT / "tests/data/spectra").glob("*.txt"))]
    return [dict(base[i % len(base)], revision=i // len(base)) for i in range(n)]


def publish(bootstrap: str, topic: str, items: list[dict]) -> None:
    codec = Codec("spectrum_packet")
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "lz4"})
    for p in items:
        producer.produce(topic, key=p["object_id"].encode(), value=codec.encode(p))
        producer.poll(0)
    assert producer.flush(60) == 0


MODES: dict[str, dict[str, dict[str, Any]]] = {
    # the walking skeleton: one thread, each batch written and published before the next is polled
    "skeleton": {"batch": {"pipelined": False}, "model": {"cpu_forward_batch": 256}},
    "pipelined": {"batch": {"pipelined": True}, "model": {"cpu_forward_batch": 256}},
    "pipelined + cpu chunks of 16": {"batch": {"pipelined": True}, "model": {"cpu_forward_batch": 16}},
}


def run_mode(kafka: KafkaService, pg: PostgresService, items: list[dict], *, mode: str,
             batch: int) -> dict:
    name = unique_name("bench")
    url = create_database(pg.dsn, name)
    settings = load_settings(
        kafka={"bootstrap_servers": kafka.bootstrap_servers, "group_id": name, "input_topics": [f"{name}-in"],
               "output_topic": f"{name}-out", "session_timeout_ms": 6000},
        database={"url": url}, batch={"max_packets": batch, "max_wait_s": 0.2, **MODES[mode]["batch"]},
        model=MODES[mode]["model"])
    ensure_topics(settings.kafka, settings.kafka.input_topics, partitions=3)
    ensure_topics(settings.kafka, [settings.kafka.output_topic, settings.kafka.dead_letter_topic])
    publish(kafka.bootstrap_servers, settings.kafka.input_topics[0], items)
    daemon = build_daemon(settings, serve_metrics=False)
    t0 = time.perf_counter()
    stats = daemon.run(max_messages=len(items), idle_timeout_s=120)
    elapsed = time.perf_counter() - t0
    assert stats.classified == len(items), stats
    stage = {s.labels["stage"]: s.value for m in daemon.metrics.registry.collect()
             if m.name == "spectranet_stage_seconds" for s in m.samples if s.name.endswith("_sum")}
    return {"mode": mode, "packets": len(items), "batch": batch, "seconds": round(elapsed, 2),
            "packets_per_s": round(len(items) / elapsed, 1),
            "stage_seconds": {k: round(v, 2) for k, v in stage.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/pipeline.json")
    args = ap.parse_args()
    kafka, pg = start_kafka(), start_postgres()
    try:
        items = packets(args.packets)
        results = [run_mode(kafka, pg, items, mode=m, batch=args.batch) for m in MODES]
    finally:
        kafka.stop()
        pg.stop()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=ROOT).stdout.strip(),
        "machine": {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version()},
        "kafka": kafka.backend, "postgres": pg.backend,
        "load_average_at_end": os.getloadavg(),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "results": results,
        "speedup_vs_skeleton": {r["mode"]: round(r["packets_per_s"] / results[0]["packets_per_s"], 2)
                                for r in results},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
