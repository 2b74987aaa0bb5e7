"""Model only, on a CUDA GPU: spectra/s of the daemon's inference path and of the bare forward pass, both presets.

    python bench/bench_gpu.py [--out bench/results/gpu.json]

``engine`` times ``InferenceEngine.predict_arrays`` (pinned host buffer, copy, bf16 autocast forward, softmax, one
``Prediction`` per spectrum in Python: what a daemon batch costs); ``forward`` times the model alone on a tensor
already on the GPU, synchronised, so the gap between the two is the host-side work. Random weights: speed does not
depend on training. Needs CUDA; exits with a message otherwise.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from spectranet.streamer.science.checkpoint import Checkpoint  # noqa: E402
from spectranet.streamer.science.inference import InferenceEngine  # noqa: E402
from spectranet.streamer.science.model import PRESETS, SpectraNet, count_flops  # noqa: E402
from spectranet.streamer.science.preprocess import Grid, PreprocessConfig  # noqa: E402
from spectranet.streamer.science.taxonomy import CLASSES  # noqa: E402

BATCHES = {"default": (64, 256, 1024, 4096), "paper": (16, 64, 256)}


def _timed(fn, *, min_time: float, max_iters: int = 200) -> list[float]:
    fn()  # warm-up: cuDNN algorithm choice, allocator
    torch.cuda.synchronize()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_iters and (not times or time.perf_counter() - start < min_time):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def run(min_time: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__, "python": platform.python_version(), "results": [], "flops_per_spectrum": {}}
    for preset, sizes in BATCHES.items():
        config = PRESETS[preset]
        torch.manual_seed(0)
        model = SpectraNet(config)
        out["flops_per_spectrum"][preset] = count_flops(model)
        ckpt = Checkpoint(name=f"bench-{preset}", version="0.0.0", model_config=config, taxonomy=CLASSES,
                          preprocess=PreprocessConfig(grid=Grid(3500.0, 10000.0, config.n_bins)),
                          weights_sha256="", state_dict=model.state_dict())
        engine = InferenceEngine(ckpt, device="cuda", max_forward_batch=max(sizes), warmup=False)
        for batch in sizes:
            x = np.random.default_rng(0).normal(size=(batch, 2, config.n_bins)).astype(np.float32)
            t_engine = _timed(lambda x=x, e=engine: e.predict_arrays(x), min_time=min_time)
            xd = torch.from_numpy(x).cuda()

            def forward(xd: torch.Tensor = xd, m: torch.nn.Module = engine.model) -> None:
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                    m(xd)

            t_fwd = _timed(forward, min_time=min_time)
            row = {"preset": preset, "batch": batch,
                   "engine_spectra_per_s": round(batch / float(np.median(t_engine)), 1),
                   "forward_spectra_per_s": round(batch / float(np.median(t_fwd)), 1),
                   "engine_batch_ms_p50": round(1e3 * float(np.median(t_engine)), 3),
                   "forward_batch_ms_p50": round(1e3 * float(np.median(t_fwd)), 3)}
            row["forward_tflop_per_s"] = round(row["forward_spectra_per_s"] * out["flops_per_spectrum"][preset] / 1e12,
                                               2)
            out["results"].append(row)
            print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/gpu.json")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing measured", file=sys.stderr)
        return 2
    result = run(args.min_time)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
