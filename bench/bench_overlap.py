"""Threads or processes for overlapping the next batch's decode + preprocessing with this batch's inference?

    python bench/bench_overlap.py [--batches 30] [--batch 64]

No broker, no database: the same real packets (tests/data/spectra, Avro-encoded) go through decode + validate +
prepare and the shipped model in three arrangements, timed end to end: inline (what the daemon's main thread does
today), a prepare thread one batch ahead, a prepare process one batch ahead (results pickled back). Writes
bench/results/overlap.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spectranet.streamer.contract.codec import Codec  # noqa: E402
from spectranet.streamer.contract.packets import prepare_packet  # noqa: E402
from spectranet.streamer.contract.readers import read_spectrum  # noqa: E402
from spectranet.streamer.runtime.classifier import SpectrumClassifier  # noqa: E402
from spectranet.streamer.science.checkpoint import load_checkpoint  # noqa: E402
from spectranet.streamer.science.inference import InferenceEngine  # noqa: E402
from spectranet.streamer.science.preprocess import Prepared  # noqa: E402
from spectranet.streamer.tools.files import packet_from_file  # noqa: E402

_WORKER: SpectrumClassifier | None = None


def _classifier() -> SpectrumClassifier:
    global _WORKER
    if _WORKER is None:  # one per process: the engine is not needed for preparing, but the classifier holds config
        _WORKER = SpectrumClassifier(InferenceEngine(load_checkpoint(), device="cpu", warmup=False),
                                     codec=Codec("spectrum_packet"))
    return _WORKER


def prepare_batch(values: list[bytes]) -> list[Prepared]:
    """Decode, validate, prepare (the daemon's per-packet work before inference); arrays dropped from the result."""
    c = _classifier()
    return [prepare_packet(c.codec.decode(v), c.model.preprocess, c.limits) for v in values]


def run(values: list[list[bytes]], engine: InferenceEngine, pool: Executor | None) -> float:
    t0 = time.perf_counter()
    if pool is None:
        for batch in values:
            engine.predict(prepare_batch(batch))
    else:
        ahead = pool.submit(prepare_batch, values[0])
        for i in range(len(values)):
            prepared = ahead.result()
            if i + 1 < len(values):
                ahead = pool.submit(prepare_batch, values[i + 1])  # next batch prepares while this one infers
            engine.predict(prepared)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    codec = Codec("spectrum_packet")
    base = [codec.encode(packet_from_file(read_spectrum(p)))
            for p in sorted((ROOT / "tests/data/spectra").glob("*.txt"))]
    flat = [base[i % len(base)] for i in range(args.batches * args.batch)]
    values = [flat[i:i + args.batch] for i in range(0, len(flat), args.batch)]
    engine = InferenceEngine(load_checkpoint(), device="cpu")
    results: dict[str, Any] = {}
    # spawn, not fork: forking a process whose torch/OpenMP threads are running deadlocks the child.
    spawn = multiprocessing.get_context("spawn")
    with ThreadPoolExecutor(1) as threads, ProcessPoolExecutor(1, mp_context=spawn) as procs:
        procs.submit(prepare_batch, values[0][:1]).result()  # start the worker outside the timing
        for _ in range(2):
            for name, pool in (("inline", None), ("thread", threads), ("process", procs)):
                dt = run(values, engine, pool)
                results.setdefault(name, []).append(round(len(flat) / dt, 1))
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=ROOT).stdout.strip(),
        "cpus": os.cpu_count(), "load_average": os.getloadavg(), "packets": len(flat), "batch": args.batch,
        "spectra_per_s": results, "best": {k: max(v) for k, v in results.items()},
    }
    out = ROOT / "bench/results/overlap.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
