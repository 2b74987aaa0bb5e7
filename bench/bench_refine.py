"""Template refinement of redshifts (``spectranet.streamer.science.templates``): cost and accuracy.

Cost, on one thread (BLAS pinned to one thread before numpy loads): ``refine_redshift`` on the real spectra in
tests/data/spectra, prepared as the daemon prepares them, with the shipped model's redshift as the prior and the
shipped bank; all templates and the daemon's default (the network's top two classes), batch 1 and 64, wall and CPU
time. The screen's product is also timed against the FFT alternative (full cross-correlation of every template by
rfft, then the window's lags), which is how the matrix product was chosen.

Accuracy (``--accuracy``): real WISeREP/OSC spectra from the shared data (observed frame, known redshift, a taxonomy
label), one per object, put through ``prepare`` at their own redshift; a bank built WITHOUT those objects. The first
half of the objects tuned the thresholds and error model (``RefineConfig`` defaults); the second half is reported
here. Priors: the true z moved by Gaussian noise of 0.02 in ln(1 + z) (seeded), and the shipped network's own z.
Reported before/after: NMAD of dz/(1+z), outliers |dz| > 0.15 and |dz|/(1+z) > 0.05, the share refined, and the
calibration of z_err (NMAD of dz / z_err).

    python bench/bench_refine.py [--accuracy] [--n 2200] [--out bench/results/refine.json]
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one thread: BLAS would otherwise spin a second one for these small products

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from common import ROOT, SPECTRA, load, machine  # noqa: E402
from spectranet.streamer.contract.readers import prepare_file, read_spectrum  # noqa: E402
from spectranet.streamer.errors import SpectraNetError  # noqa: E402
from spectranet.streamer.science.checkpoint import load_checkpoint  # noqa: E402
from spectranet.streamer.science.inference import InferenceEngine  # noqa: E402
from spectranet.streamer.science.templates import (  # noqa: E402
    METHOD_TEMPLATE,
    TemplateBank,
    _plan,
    _screen,
    _work,
    default_template_bank_path,
    load_template_bank,
    refine_redshift,
)

SEED = 14


def _nmad(x: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(x - np.median(x)))) if x.size else math.nan


def _z_metrics(z: np.ndarray, z_true: np.ndarray) -> dict[str, float]:
    dz = (z - z_true) / (1.0 + z_true)
    return {"nmad": round(_nmad(dz), 5), "outliers_abs_dz_gt_0.15": round(float(np.mean(np.abs(z - z_true) > 0.15)), 4),
            "outliers_dz_1pz_gt_0.05": round(float(np.mean(np.abs(dz) > 0.05)), 4)}


def _network(ckpt: Any, flux: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, list[set[str]]]:
    engine = InferenceEngine(ckpt, device="cpu", threads=1, warmup=False)
    preds = engine.predict_arrays(np.stack([flux, cov.astype(np.float32)], axis=1))
    top2 = [set(sorted(p.probabilities, key=p.probabilities.__getitem__, reverse=True)[:2]) for p in preds]
    return np.array([p.z for p in preds]), top2


# ------------------------------------------------------------------------------------------------------------ cost


def _time(fn: Any, n_spectra: int, *, min_time: float = 3.0) -> dict[str, Any]:
    fn()  # warm-up
    runs, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while runs == 0 or time.perf_counter() - wall0 < min_time:
        fn()
        runs += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    n = runs * n_spectra
    return {"ms_per_spectrum_wall": round(1e3 * wall / n, 3), "ms_per_spectrum_cpu": round(1e3 * cpu / n, 3),
            "spectra_per_s_wall": round(n / wall, 1), "spectra": n, "load_average": load()}


def _fft_screen(bank: TemplateBank, x: np.ndarray, cov: np.ndarray, z: float, window: float, grid: Any) -> np.ndarray:
    """The FFT alternative to the screen's product: every template's full cross-correlation, the window's lags."""
    work = _work(bank, grid)
    n_fft = 1 << int(math.ceil(math.log2(work.n_rows + x.shape[0])))
    spec = _FFT_CACHE.get(id(bank))
    if spec is None:
        spec = _FFT_CACHE.setdefault(id(bank), np.fft.rfft(work.t, n_fft))  # [N, F]
    xf = np.conj(np.fft.rfft(np.where(cov, x, 0.0), n_fft))
    corr = np.fft.irfft(spec * xf[None, :], n_fft)  # [N, n_fft]: corr[o] = sum_j x_j t_{j + o}
    s_mid = math.log1p(z) / work.dln
    half = window / work.dln
    shifts = np.arange(math.floor(s_mid - half), math.ceil(s_mid + half) + 1)
    return (corr[:, work.offset - shifts] / work.norm[:, None]).max(axis=1)


_FFT_CACHE: dict[int, np.ndarray] = {}


def bench_cost(ckpt: Any, bank: TemplateBank) -> dict[str, Any]:
    grid = ckpt.preprocess.grid
    prepared = []
    for path in sorted(SPECTRA.glob("*.txt")):
        try:
            prepared.append(prepare_file(read_spectrum(path), ckpt.preprocess))
        except SpectraNetError:
            continue
    flux = np.stack([p.flux for p in prepared])
    cov = np.stack([p.coverage for p in prepared])
    z_net, top2 = _network(ckpt, flux, cov)
    n = len(prepared)
    out: dict[str, Any] = {"spectra": n, "templates": len(bank)}
    for name, classes in (("all templates", None), ("top-2 classes (daemon default)", top2)):
        out[f"{name}, batch {n}"] = _time(lambda c=classes: refine_redshift(flux, cov, z_net, bank, grid, classes=c), n)
        out[f"{name}, batch 1"] = _time(
            lambda c=classes: [refine_redshift(flux[i:i + 1], cov[i:i + 1], z_net[i:i + 1], bank, grid,
                                               classes=None if c is None else [c[i]]) for i in range(64)], 64)
    res = refine_redshift(flux, cov, z_net, bank, grid, classes=top2)
    out["share refined (method template)"] = round(float(np.mean(res.method == METHOD_TEMPLATE)), 3)
    # the engine with and without the bank, alternated (8 rounds of 3 calls) so that the load hits both alike
    x64 = np.stack([flux, cov.astype(np.float32)], axis=1)[:64]
    engines = {"network only": InferenceEngine(ckpt, device="cpu", threads=1, warmup=False),
               "with refinement": InferenceEngine(ckpt, device="cpu", threads=1, warmup=False, templates=bank)}
    rounds: dict[str, list[tuple[float, float]]] = {k: [] for k in engines}
    for _ in range(8):
        for name, engine in engines.items():
            engine.predict_arrays(x64)
            wall0, cpu0 = time.perf_counter(), time.process_time()
            for _ in range(3):
                engine.predict_arrays(x64)
            rounds[name].append((time.perf_counter() - wall0, time.process_time() - cpu0))
    for name, times in rounds.items():
        out[f"engine.predict_arrays, batch 64, {name}"] = {
            "ms_per_spectrum_wall (median of 8)": round(1e3 * float(np.median([w for w, _ in times])) / 192, 3),
            "ms_per_spectrum_cpu (median of 8)": round(1e3 * float(np.median([c for _, c in times])) / 192, 3),
            "load_average": load()}

    # the screen alone: one matrix product over the window's shifts (alone, and 16 spectra stacked as the refinement
    # does) vs every template's full cross-correlation by FFT
    work = _work(bank, grid)
    plans = [plan for i in range(16)
             if (plan := _plan(flux[i], cov[i], float(z_net[i]), work, window=0.03, allowed=None)) is not None]
    out["screen: matrix product, 1 spectrum (ms per spectrum)"] = _time(
        lambda: _screen(plans[:1], work, slice(0, len(bank))), 1, min_time=2.0)["ms_per_spectrum_cpu"]
    out["screen: matrix product, 16 stacked (ms per spectrum)"] = _time(
        lambda: _screen(plans, work, slice(0, len(bank))), len(plans), min_time=2.0)["ms_per_spectrum_cpu"]
    out["screen: FFT cross-correlation (ms per spectrum)"] = _time(
        lambda: _fft_screen(bank, flux[0], cov[0], float(z_net[0]), 0.03, grid), 1, min_time=2.0)["ms_per_spectrum_cpu"]
    return out


# -------------------------------------------------------------------------------------------------------- accuracy


def _sample(ckpt: Any, n: int) -> dict[str, np.ndarray]:
    from spectranet.training.data import DEFAULT_DATA_DIR, canonical_object, read_manifest

    entries = [e for e in read_manifest(DEFAULT_DATA_DIR / "manifest.csv")
               if e.source in ("wiserep", "osc") and e.frame == "observed" and e.label is not None
               and e.redshift is not None and e.redshift > 0.0]
    by_object: dict[str, list[Any]] = defaultdict(list)
    for e in entries:
        by_object[canonical_object(e.object_id)].append(e)
    rng = np.random.default_rng(SEED)
    objects = sorted(by_object)
    rng.shuffle(objects)
    rows: dict[str, list[Any]] = defaultdict(list)
    for obj in objects:
        if len(rows["z"]) >= n:
            break
        es = by_object[obj]
        e = es[rng.integers(len(es))]
        try:
            p = prepare_file(read_spectrum(e.path), ckpt.preprocess)
        except SpectraNetError:
            continue
        for k, v in (("flux", p.flux), ("cov", p.coverage), ("z", e.redshift), ("object", obj), ("label", e.label)):
            rows[k].append(v)
    return {k: np.array(v) for k, v in rows.items()}


def bench_accuracy(ckpt: Any, n: int) -> dict[str, Any]:
    from spectranet.training.data import DEFAULT_DATA_DIR, read_manifest
    from spectranet.training.template_bank import BankSettings, build_template_bank

    s = _sample(ckpt, n)
    grid = ckpt.preprocess.grid
    bank = build_template_bank(read_manifest(DEFAULT_DATA_DIR / "manifest.csv"), grid, settings=BankSettings(),
                               exclude=set(s["object"]))
    report = np.arange(len(s["z"])) >= len(s["z"]) // 2  # the first half tuned RefineConfig's defaults
    z_true = s["z"][report]
    flux, cov = s["flux"][report], s["cov"][report]
    z_net, top2 = _network(ckpt, flux, cov)
    rng = np.random.default_rng(SEED)
    z_noisy = np.maximum(np.expm1(np.log1p(z_true) + rng.normal(0.0, 0.02, z_true.shape)), 0.0)
    out: dict[str, Any] = {"spectra": int(report.sum()), "objects_excluded_from_bank": len(set(s["object"])),
                           "bank_templates": len(bank), "labels": dict(zip(*np.unique(s["label"][report],
                                                                                     return_counts=True)))}
    out["labels"] = {str(k): int(v) for k, v in out["labels"].items()}
    for prior_name, prior in (("true z + N(0, 0.02) in ln(1+z)", z_noisy), ("network 0.3.0", z_net)):
        for cls_name, classes in (("all templates", None), ("top-2 classes", top2)):
            res = refine_redshift(flux, cov, prior, bank, grid, classes=classes)
            used = res.method == METHOD_TEMPLATE
            pull = (res.z[used] - z_true[used]) / res.z_err[used]
            out[f"prior {prior_name}, {cls_name}"] = {
                "before": _z_metrics(prior, z_true), "after": _z_metrics(res.z, z_true),
                "share refined": round(float(used.mean()), 3),
                "refined only": {"before": _z_metrics(prior[used], z_true[used]),
                                 "after": _z_metrics(res.z[used], z_true[used])},
                "z_err calibration: NMAD of dz / z_err (1 is calibrated)": round(_nmad(pull), 3),
                "share |dz| < z_err": round(float(np.mean(np.abs(pull) < 1)), 3),
            }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accuracy", action="store_true", help="also measure accuracy on real spectra (shared data)")
    ap.add_argument("--n", type=int, default=2200, help="spectra in the accuracy sample (half tuned, half reported)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "refine.json"))
    args = ap.parse_args()
    ckpt = load_checkpoint()
    bank = load_template_bank(default_template_bank_path())
    result: dict[str, Any] = {"machine": machine(threads=1), "bank": {"version": bank.version, "sha256": bank.sha256,
                                                                       "templates": len(bank)}}
    result["cost"] = bench_cost(ckpt, bank)
    print(json.dumps(result["cost"], indent=2))
    if args.accuracy:
        result["accuracy"] = bench_accuracy(ckpt, args.n)
        print(json.dumps(result["accuracy"], indent=2))
    result["load_at_end"] = load()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
