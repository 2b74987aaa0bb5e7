"""Benchmark the science core on CPU: model size, FLOPs and inference throughput per preset, preprocessing throughput.

For each model preset: parameters, forward FLOPs per spectrum (``streamer.model.count_flops``) and spectra/s through
``InferenceEngine.predict_arrays`` (the daemon's path: stack, forward under ``inference_mode``, softmax, per-spectrum
results) at several batch sizes, after one warm-up batch. Random weights: speed does not depend on training.
Preprocessing: ``prepare()`` on every real spectrum in ``tests/data/spectra`` (files read once, before timing).

Prints a Markdown table and writes it, with the machine it ran on, to ``bench/RESULTS.md``::

    python bench/bench_inference.py [--min-time 2] [--threads N] [--note "a training job shared the CPU"]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from streamer.checkpoint import Checkpoint
from streamer.engine import InferenceEngine
from streamer.errors import PacketError
from streamer.model import PRESETS, SpectraNet, count_flops, count_parameters
from streamer.preprocess import Grid, PreprocessConfig, prepare
from streamer.readers import read_spectrum
from streamer.taxonomy import CLASSES

ROOT = Path(__file__).resolve().parents[1]
SPECTRA = ROOT / "tests" / "data" / "spectra"
# batch sizes per preset, and at most this many timed batches (the paper preset is ~35 GFLOP per spectrum)
BATCH_SIZES = {"default": (1, 32, 256), "paper": (1, 32)}
MAX_BATCHES = {"default": 200, "paper": 3}


@dataclass(frozen=True)
class Throughput:
    batch_size: int
    spectra_per_s: float
    n_batches: int


def _engine(preset: str, batch_size: int) -> InferenceEngine:
    config = PRESETS[preset]
    torch.manual_seed(0)
    model = SpectraNet(config)
    ckpt = Checkpoint(name=f"bench-{preset}", version="0.0.0", model_config=config, taxonomy=CLASSES,
                      preprocess=PreprocessConfig(grid=Grid(3500.0, 10000.0, config.n_bins)),
                      weights_sha256="", state_dict=model.state_dict())
    return InferenceEngine(ckpt, device="cpu", max_batch_size=batch_size, warmup=False)


def time_inference(preset: str, batch_size: int, *, min_time: float) -> Throughput:
    engine = _engine(preset, batch_size)
    x = np.random.default_rng(0).normal(size=(batch_size, 2, PRESETS[preset].n_bins)).astype(np.float32)
    engine.predict_arrays(x[: min(batch_size, 4)])  # warm-up
    n, start = 0, time.perf_counter()
    while n < MAX_BATCHES[preset] and (n == 0 or time.perf_counter() - start < min_time):
        engine.predict_arrays(x)
        n += 1
    return Throughput(batch_size, n * batch_size / (time.perf_counter() - start), n)


def time_preprocess(normalisation: str, *, min_time: float) -> tuple[float, int]:
    """spectra/s of ``prepare()`` over the real spectra that it accepts, and how many those are."""
    config = PreprocessConfig(normalisation=normalisation)
    files = [read_spectrum(p) for p in sorted(SPECTRA.glob("*.txt"))]

    def run_all() -> int:
        ok = 0
        for sf in files:
            wavelength = sf.wavelength * (1.0 + (sf.redshift or 0.0)) if sf.frame == "rest" else sf.wavelength
            try:
                prepare(wavelength, sf.flux, flux_err=sf.flux_err, wavelength_unit=sf.wavelength_unit,
                        flux_unit=sf.flux_unit, flux_calibrated=sf.flux_calibrated, config=config)
            except PacketError:  # counted at the cost of the refusal; tests check the errors themselves
                continue
            ok += 1
        return ok

    ok = run_all()  # warm-up (unit parsing caches, grid edges)
    n, start = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - start < min_time:
        run_all()
        n += 1
    return n * len(files) / (time.perf_counter() - start), ok


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds of timed batches per measurement")
    ap.add_argument("--note", default="", help="a line about the conditions, written to RESULTS.md")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice, one per core); "
                    "use 1 when another process is busy on the same cores, or OpenMP threads spin against it")
    ap.add_argument("--output", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    load = os.getloadavg()[0]
    rows = ["| preset | parameters | FLOPs / spectrum | batch | spectra/s (CPU) | timed batches |",
            "|---|---:|---:|---:|---:|---:|"]
    for preset, sizes in BATCH_SIZES.items():
        model = SpectraNet(PRESETS[preset]).eval()
        params, flops = count_parameters(model), count_flops(model)
        del model
        for bs in sizes:
            t = time_inference(preset, bs, min_time=args.min_time)
            rows.append(f"| {preset} | {params / 1e6:.2f} M | {flops / 1e9:.2f} G | {bs} | "
                        f"{t.spectra_per_s:,.1f} | {t.n_batches} |")
            print(rows[-1], flush=True)

    pre_rows = ["| prepare() normalisation | spectra/s (CPU, one process) | spectra accepted |", "|---|---:|---:|"]
    n_files = len(list(SPECTRA.glob("*.txt")))
    for normalisation in ("robust", "continuum"):
        rate, ok = time_preprocess(normalisation, min_time=args.min_time)
        pre_rows.append(f"| {normalisation} | {rate:,.0f} | {ok} of {n_files} |")
        print(pre_rows[-1], flush=True)

    machine = [
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- CPU: {_cpu_model()}; `nproc` = {len(os.sched_getaffinity(0))}; torch threads = {torch.get_num_threads()}",
        f"- torch {torch.__version__}, numpy {np.__version__}, Python {platform.python_version()}",
        f"- load average when the run started: {load:.2f}",
    ]
    if args.note:
        machine.append(f"- note: {args.note}")
    text = "\n".join([
        "# Inference benchmark", "",
        "`python bench/bench_inference.py` (random weights; speed does not depend on training). Inference goes "
        "through `InferenceEngine.predict_arrays` on CPU, so it includes stacking, softmax and the per-spectrum "
        "results; FLOPs are forward-pass FLOPs of one spectrum counted by torch's FLOP counter "
        "(`streamer.model.count_flops`). Preprocessing times `prepare()` on the real spectra of `tests/data/spectra`, "
        "files already read; spectra that preprocessing refuses count at the cost of their refusal.", "",
        "## Machine", "", *machine, "",
        "## Model", "", *rows, "",
        "## Preprocessing", "", *pre_rows, "",
    ])
    args.output.write_text(text)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
