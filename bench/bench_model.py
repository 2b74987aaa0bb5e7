"""Model only, on CPU: spectra/s and per-batch latency against batch size, FLOPs per spectrum, and the machine's
dense float32 matmul FLOP/s under the same thread settings, giving an efficiency ratio.

    python bench/bench_model.py [--quick] [--threads 1]

Inference goes through ``InferenceEngine.predict_arrays`` (the daemon's path: stack, forward under
``inference_mode``, softmax, per-spectrum results); random weights, since speed does not depend on training.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch
from common import ROOT, load, machine, percentile
from spectranet.streamer.science.checkpoint import Checkpoint, load_checkpoint
from spectranet.streamer.science.inference import InferenceEngine
from spectranet.streamer.science.model import PRESETS, ModelConfig, SpectraNet, count_flops, count_parameters
from spectranet.streamer.science.preprocess import Grid, PreprocessConfig
from spectranet.streamer.science.taxonomy import CLASSES

# "shipped": the packaged model's own architecture (since 0.2.0 the default preset as two networks)
BATCHES = {"default": (1, 8, 32, 64, 128, 256), "shipped": (1, 8, 16, 32, 64), "paper": (1, 8)}  # 64: micro-batch
QUICK_BATCHES = {"default": (1, 8, 32, 64, 128, 256), "shipped": (1, 8, 16, 64), "paper": (1,)}


def _config(preset: str) -> ModelConfig:
    return load_checkpoint().model_config if preset == "shipped" else PRESETS[preset]


def _engine(preset: str, batch: int) -> InferenceEngine:
    config = _config(preset)
    torch.manual_seed(0)
    model = SpectraNet(config)
    ckpt = Checkpoint(name=f"bench-{preset}", version="0.0.0", model_config=config, taxonomy=CLASSES,
                      preprocess=PreprocessConfig(grid=Grid(3500.0, 10000.0, config.n_bins)),
                      weights_sha256="", state_dict=model.state_dict())
    return InferenceEngine(ckpt, device="cpu", max_forward_batch=batch, warmup=False)


def time_batches(preset: str, batch: int, *, min_time: float, max_batches: int) -> dict[str, Any]:
    engine = _engine(preset, batch)
    x = np.random.default_rng(0).normal(size=(batch, 2, _config(preset).n_bins)).astype(np.float32)
    engine.predict_arrays(x[: min(batch, 8)])  # warm-up (allocator, oneDNN primitive cache)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_batches and (not times or time.perf_counter() - start < min_time):
        t = time.perf_counter()
        engine.predict_arrays(x)
        times.append(time.perf_counter() - t)
    total = sum(times)
    return {"preset": preset, "batch": batch, "batches": len(times),
            "spectra_per_s": round(batch * len(times) / total, 2),
            "spectra_per_s_median": round(batch / percentile(times, 50), 2),
            "batch_ms_mean": round(1e3 * total / len(times), 3), "batch_ms_p50": round(1e3 * percentile(times, 50), 3),
            "load_average": load()}


def matmul_flops(*, min_time: float, n: int = 2048) -> dict[str, Any]:
    a = torch.randn(n, n, dtype=torch.float32)
    b = torch.randn(n, n, dtype=torch.float32)
    torch.matmul(a, b)  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while not times or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - t)
    return {"n": n, "matmuls": len(times), "flop_per_s": 2 * n ** 3 * len(times) / sum(times),
            "flop_per_s_median": 2 * n ** 3 / percentile(times, 50), "load_average": load()}


def run(*, quick: bool, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    min_time = 0.4 if quick else 2.0
    out: dict[str, Any] = {"machine": machine(threads), "presets": {}, "throughput": []}
    out["matmul_before"] = matmul_flops(min_time=min_time)
    for preset, sizes in (QUICK_BATCHES if quick else BATCHES).items():
        model = SpectraNet(_config(preset)).eval()
        out["presets"][preset] = {"parameters": count_parameters(model), "flops_per_spectrum": count_flops(model)}
        del model
        for bs in sizes:
            cheap = preset != "paper"
            r = time_batches(preset, bs, min_time=min_time if cheap else 0.0,
                             max_batches=400 if cheap else (1 if quick else 2))
            out["throughput"].append(r)
            print(json.dumps(r), flush=True)
    out["matmul_after"] = matmul_flops(min_time=min_time)
    # Efficiency from medians (per batch, per matmul): robust to the other load's bursts, the same on both sides.
    matmul = max(out["matmul_before"]["flop_per_s_median"], out["matmul_after"]["flop_per_s_median"])
    out["matmul_flop_per_s"] = matmul
    for preset, info in out["presets"].items():
        best = max((r for r in out["throughput"] if r["preset"] == preset), key=lambda r: r["spectra_per_s_median"])
        achieved = best["spectra_per_s_median"] * info["flops_per_spectrum"]
        info.update(best_batch=best["batch"], best_spectra_per_s=best["spectra_per_s"],
                    best_spectra_per_s_median=best["spectra_per_s_median"], achieved_flop_per_s=achieved,
                    efficiency=achieved / matmul)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    result = run(quick=args.quick, threads=args.threads)
    path = ROOT / "bench/results/model.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["presets"], indent=2))


if __name__ == "__main__":
    main()
