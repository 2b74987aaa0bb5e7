"""Calibrate a trained checkpoint: temperature and class bias, per-class purity thresholds, out-of-distribution score.

    python -m spectranet.training.calibrate --model runs/v040/spectranet-sedm-0.4.0 --out runs/v040/calibrated

Reads top to bottom:

1. data: the checkpoint's own object-held-out split (same manifest, seed and validation objects as its training).
2. sets: the training spectra once through the SEDM simulation (features for the out-of-distribution model); the
   validation spectra as **real-degraded** (real observed spectra at their own redshift, degraded to SEDM) and as
   **simulated** (rest-frame templates at drawn redshifts); see ``evaluation_sets``.
3. fit on validation: the softmax temperature and class bias (NLL, ``metrics.fit_temperature_and_bias``) and the
   per-class thresholds for the target purities (``TARGET_PURITY``) on the logits the daemon computes (the engine with
   the template bank built without the validation objects: refined z, classified again where it moved) of the
   **real-degraded** set (real spectra: the
   class mix and the look of what the daemon sees; templates at drawn redshifts are neither), and the
   out-of-distribution score: training transients against non-transients (the rest-frame templates simulated at SEDM
   resolution and the real M dwarfs, galaxies and AGN degraded to SEDM, ``OOD_REAL_DRAWS`` draws each;
   ``OodData``), thresholded at ``OOD_QUANTILE`` of in-taxonomy validation scores (both sets).
4. write the checkpoint again with the temperature and ``calibration`` in its card (weights unchanged).

Everything fitted here uses validation spectra, so ``spectranet evaluate`` reports calibration metrics cross-fitted
(fit on one half of the validation objects, scored on the other, and back), never on the spectra it was fitted on;
likewise the real non-transients flagged are cross-fitted (``OOD_FOLDS`` folds by object, ``fit_ood(exclude=...)``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from spectranet.streamer.errors import PreprocessError, SpectraNetError
from spectranet.streamer.science.calibration import (
    Calibration,
    OutOfDistribution,
    fit_out_of_distribution,
    purity_thresholds,
)
from spectranet.streamer.science.checkpoint import Checkpoint, load_checkpoint, save_derived
from spectranet.streamer.science.inference import InferenceEngine
from spectranet.streamer.science.preprocess import Grid, PreprocessConfig
from spectranet.streamer.science.taxonomy import CLASSES
from spectranet.streamer.science.templates import TemplateBank
from spectranet.training import metrics as M
from spectranet.training.data import Spectrum, drop_leaked, read_manifest
from spectranet.training.simulate import SEDM_DEFAULT, simulate_input
from spectranet.training.template_bank import build_template_bank
from spectranet.training.train import TrainConfig, load_split

__all__ = ["TARGET_PURITY", "OOD_QUANTILE", "OBSERVED_SOURCES", "Outputs", "EvalSet", "evaluation_sets",
           "real_degraded", "non_transient_templates", "simulate_non_transients", "non_transient_spectra",
           "non_transient_set", "OOD_REAL_DRAWS", "OOD_L2", "OOD_FOLDS", "OodData", "ood_data", "fit_ood",
           "cross_fitted_non_transients", "run_model", "fit_probabilities", "fit_calibration",
           "validation_template_bank", "final_engine", "object_folds", "calibrate"]

TARGET_PURITY = {"Ia": 0.99, **{c: 0.90 for c in CLASSES if c != "Ia"}}
OOD_QUANTILE = 0.96
# The real non-transients as negatives of the out-of-distribution fit (from 0.9.4), OOD_REAL_DRAWS SEDM draws each, and
# the fit's L2 (scikit-learn's C). Measured on 0.9.1's network, 5 folds by object (3 fold assignments alike): flagged
# 62/70 -> 66/70 (all 66 M dwarfs; C 0.001-0.03 and 5 or 20 draws all 66/70); in-taxonomy flagged, cross-fitted
# halves, 4.1% -> 4.2% (`spectranet evaluate`); real SEDM spectra flagged at C 0.003 / 0.01 / 0.03: 5.9% / 2.4% /
# 0-0.5% (1 of 41 before).
OOD_REAL_DRAWS = 20
OOD_L2 = 0.01
OOD_FOLDS = 5
OBSERVED_SOURCES = frozenset({"wiserep", "sedm", "osc", "osc-tde", "slsne"})  # real spectra, observed frame
NON_TRANSIENT_TYPES = frozenset({"m-dwarf", "galaxy", "agn", "qso"})


@dataclass(frozen=True)
class EvalSet:
    """Model inputs of one evaluation set: x [N, 2, n_bins], class index y [N] (-1: not a taxonomy class), z [N]."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    objects: np.ndarray   # canonical object name per row (for object-wise cross-fitting)
    sources: np.ndarray   # manifest source per row


@dataclass(frozen=True)
class Outputs:
    logits: np.ndarray    # [N, C]
    z: np.ndarray         # [N] the redshift network's estimate
    z_err: np.ndarray     # [N]
    features: np.ndarray  # [N, H]


def _simulate(spectra: list[Spectrum], galaxies: list, preprocess: PreprocessConfig, *, seed: int,
              keep_source_z: float, labelled: bool = True) -> EvalSet:
    cfg = replace(SEDM_DEFAULT, keep_source_z=keep_source_z)
    xs, ys, zs, objs, srcs = [], [], [], [], []
    for i, s in enumerate(spectra):
        try:
            x, z = simulate_input(s, galaxies, np.random.default_rng([seed, i]), preprocess, cfg)
        except PreprocessError:
            continue
        xs.append(x)
        zs.append(z)
        objs.append(s.object_id)
        srcs.append(s.source)
        ys.append(CLASSES.index(s.label) if labelled else -1)
    n_bins = preprocess.grid.n_bins
    return EvalSet(x=np.stack(xs) if xs else np.zeros((0, 2, n_bins), np.float32), y=np.array(ys, int),
                   z=np.array(zs, float), objects=np.array(objs), sources=np.array(srcs))


def evaluation_sets(val: list[Spectrum], galaxies: list, preprocess: PreprocessConfig, *,
                    seed: int = 12345) -> dict[str, EvalSet]:
    """``real-degraded``: real observed validation spectra at their own redshift through the SEDM simulation (R~100
    line-spread, SEDM pixels, noise, coverage cuts, host light); ``simulated``: validation templates (rest frame) at
    drawn redshifts. The real SEDM spectra are scored as they are, by ``spectranet evaluate``."""
    templates = [s for s in val if s.source not in OBSERVED_SOURCES]
    return {"real-degraded": real_degraded(val, galaxies, preprocess, seed=seed),
            "simulated": _simulate(templates, galaxies, preprocess, seed=seed + 1, keep_source_z=0.0)}


def real_degraded(spectra: list[Spectrum], galaxies: list, preprocess: PreprocessConfig, *, seed: int) -> EvalSet:
    """The real observed spectra among ``spectra`` (with a redshift) at their own redshift through the SEDM
    simulation, one draw each (seeded by ``seed`` and position)."""
    real = [s for s in spectra if s.source in OBSERVED_SOURCES and s.redshift > 0]
    return _simulate(real, galaxies, preprocess, seed=seed, keep_source_z=1.0)


def non_transient_templates(data_manifest: str | Path) -> list[tuple[Spectrum, str]]:
    """The rest-frame non-transient templates (SNID-SAGE stars, galaxies and AGN; the host-galaxy templates), with
    their kind ('star', 'galaxy', 'agn'): negatives of the out-of-distribution fit, with the real non-transient
    spectra (``non_transient_spectra``)."""
    from spectranet.training.data import _entry_spectra

    out: list[tuple[Spectrum, str]] = []
    for e in read_manifest(data_manifest):
        kind = e.raw_type.strip().lower().split("/")[0]
        if e.source in ("snid-sage", "galaxies") and kind in ("star", "galaxy", "agn"):
            try:
                got = _entry_spectra(e)
            except (SpectraNetError, ValueError, OSError):
                continue
            out.extend((replace(s, label="Ia"), kind) for s in got)  # label unused
    return out


_NON_TRANSIENT_Z = {"star": 0.002, "galaxy": 0.3, "agn": 1.5}  # upper redshift per kind for the simulation


def simulate_non_transients(templates: list[tuple[Spectrum, str]], preprocess: PreprocessConfig, *, draws: int = 60,
                            seed: int = 5) -> np.ndarray:
    """x [N, 2, n_bins]: each non-transient template ``draws`` times through the SEDM simulation (stars at z ~ 0)."""
    rng = np.random.default_rng(seed)
    xs = []
    for _ in range(draws):
        for spec, kind in templates:
            cfg = replace(SEDM_DEFAULT, z_min=0.0, z_max=(), z_max_default=_NON_TRANSIENT_Z[kind], keep_source_z=0.0,
                          host_prob=0.0)
            try:
                x, _ = simulate_input(spec, [], rng, preprocess, cfg)
            except PreprocessError:
                continue
            xs.append(x)
    return np.stack(xs)


def non_transient_spectra(data_manifest: str | Path) -> list[Spectrum]:
    """The real non-transient spectra (M dwarfs, galaxies, an AGN: ``wiserep``) at their own redshift (0 for stars;
    the label is unused)."""
    from spectranet.training.data import _entry_spectra

    spectra: list[Spectrum] = []
    for e in read_manifest(data_manifest):
        if e.source in OBSERVED_SOURCES and e.raw_type.strip().lower() in NON_TRANSIENT_TYPES:
            try:
                got = _entry_spectra(replace(e, redshift=e.redshift or 0.0))
            except (SpectraNetError, ValueError, OSError):
                continue
            # a tiny positive z so the simulation keeps the spectrum's own redshift
            spectra.extend(replace(s, label="Ia", redshift=max(s.redshift, 1e-4)) for s in got)
    return spectra


def non_transient_set(data_manifest: str | Path, galaxies: list, preprocess: PreprocessConfig, *,
                      seed: int = 54321) -> EvalSet:
    """The real non-transient spectra degraded to SEDM at their own redshift, one draw each: what a follow-up stream
    meets and the model must call out of distribution (scored cross-fitted: ``cross_fitted_non_transients``)."""
    return _simulate(non_transient_spectra(data_manifest), galaxies, preprocess, seed=seed, keep_source_z=1.0,
                     labelled=False)


@dataclass(frozen=True)
class OodData:
    """What the out-of-distribution score is fitted on: input flux [N, n_bins] of training transients (label 0) and
    of simulated non-transient templates (1), and the real non-transients' SEDM draws (1; with their objects, so
    that cross-fitting can leave some out)."""

    transients: np.ndarray
    templates: np.ndarray
    real: EvalSet


def ood_data(train: list[Spectrum], galaxies: list, preprocess: PreprocessConfig, data_manifest: str | Path, *,
             max_train: int = 6000, real_draws: int = OOD_REAL_DRAWS) -> OodData:
    """Up to ``max_train`` training spectra (seeded choice) once through the SEDM simulation, the non-transient
    templates 60 times each, the real non-transients ``real_draws`` times each (seeds distinct from the scoring draw
    of ``non_transient_set``)."""
    rng = np.random.default_rng(0)
    train_sub = [train[i] for i in sorted(rng.permutation(len(train))[:max_train])]
    tr = _simulate(train_sub, galaxies, preprocess, seed=777, keep_source_z=SEDM_DEFAULT.keep_source_z)
    real = non_transient_spectra(data_manifest)
    draws = [_simulate(real, galaxies, preprocess, seed=1000 + d, keep_source_z=1.0, labelled=False)
             for d in range(real_draws)] or [_simulate([], galaxies, preprocess, seed=0, keep_source_z=1.0)]
    real_set = EvalSet(**{f.name: np.concatenate([getattr(d, f.name) for d in draws]) for f in fields(EvalSet)})
    return OodData(transients=tr.x[:, 0], templates=simulate_non_transients(non_transient_templates(data_manifest),
                                                                               preprocess)[:, 0], real=real_set)


def fit_ood(data: OodData, x_val: np.ndarray, *, exclude: frozenset[str] = frozenset()) -> OutOfDistribution:
    """The out-of-distribution score on ``data`` without the real non-transients of objects ``exclude``, its
    threshold the ``OOD_QUANTILE`` of the scores of in-taxonomy validation flux ``x_val`` [N, n_bins]."""
    keep = ~np.isin(data.real.objects, sorted(exclude))
    negatives = np.concatenate([data.templates, data.real.x[keep, 0]])
    return fit_out_of_distribution(data.transients, negatives, in_distribution=x_val, quantile=OOD_QUANTILE,
                                   l2=OOD_L2)


def cross_fitted_non_transients(data: OodData, test: EvalSet, x_val: np.ndarray, *, folds: int = OOD_FOLDS,
                                seed: int = 0) -> np.ndarray:
    """Out-of-distribution flags [N] of the real non-transients ``test``, each by a score fitted without its object's
    spectra (``folds`` folds by object): how the flag does on non-transients it has not seen."""
    names = sorted(set(test.objects.tolist()))
    fold_of = dict(zip(names, np.random.default_rng(seed).permutation(len(names)) % folds))
    fold = np.array([fold_of[o] for o in test.objects], dtype=int)
    flagged = np.zeros(len(test.y), bool)
    for k in range(folds):
        here = fold == k
        if here.any():
            ood = fit_ood(data, x_val, exclude=frozenset(o for o in names if fold_of[o] == k))
            flagged[here] = ood.flag(test.x[here, 0])
    return flagged


@torch.inference_mode()
def run_model(model: torch.nn.Module, x: np.ndarray, *, batch: int = 256, z: np.ndarray | None = None) -> Outputs:
    """Logits, redshift and features of ``model`` (eval mode) over x [N, 2, n_bins]; ``z`` (two networks): the
    redshifts the classifier's rest-frame views use instead of the network's own."""
    model.eval()
    logits, zm, ze, feats = [], [], [], []
    for k in range(0, len(x), batch):
        zb = None if z is None else torch.as_tensor(z[k:k + batch], dtype=torch.float32)
        out = model(torch.from_numpy(np.ascontiguousarray(x[k:k + batch])), zb)
        logits.append(out.logits.float())
        zm.append(out.z_mean.float().clamp(min=0.0))
        ze.append(torch.exp(0.5 * out.z_logvar.float()))
        feats.append(out.features.float())
    if not logits:
        return Outputs(np.zeros((0, len(CLASSES))), np.zeros(0), np.zeros(0), np.zeros((0, 1)))
    return Outputs(torch.cat(logits).numpy(), torch.cat(zm).numpy(), torch.cat(ze).numpy(), torch.cat(feats).numpy())


def fit_probabilities(logits: np.ndarray, y: np.ndarray) -> tuple[float, Calibration]:
    """Temperature, class bias and purity thresholds fitted on validation logits [N, C] and labels [N] (no
    out-of-distribution model); ``spectranet evaluate`` refits exactly this on object halves to cross-fit."""
    temperature, bias = M.fit_temperature_and_bias(logits, y, len(CLASSES))
    calibration = Calibration(target_purity=dict(TARGET_PURITY), class_bias=dict(zip(CLASSES, bias.tolist())))
    probs = calibration.probabilities(logits, temperature, CLASSES)
    return temperature, replace(calibration, thresholds=purity_thresholds(probs, y, CLASSES, TARGET_PURITY))


def validation_template_bank(data_manifest: str | Path, grid: Grid, val: list[Spectrum]) -> TemplateBank | None:
    """The refinement's template bank built from the manifest without the validation objects (None when the
    manifest has no template files, as in the unit tests' tiny data)."""
    try:
        return build_template_bank(read_manifest(data_manifest), grid, exclude=sorted({s.object_id for s in val}))
    except SpectraNetError:
        return None


def final_engine(ckpt: Checkpoint, bank: TemplateBank | None, *, precision: str = "float32") -> InferenceEngine:
    """The daemon's inference on ``ckpt`` with ``bank``: ``.outputs(x).logits`` are the logits its probabilities come
    from (at the refined redshift where the templates moved it), which is what calibration is fitted on. Float32 by
    default, so that a model's calibration and evaluation do not depend on the CPU they ran on."""
    return InferenceEngine(ckpt, device="cpu", warmup=False, templates=bank, cpu_forward_batch=64, precision=precision)


def fit_calibration(data: OodData, x_val: np.ndarray, real_logits: np.ndarray,
                    y_real: np.ndarray) -> tuple[float, Calibration]:
    """Temperature, class bias and purity thresholds from the final logits of the real-degraded validation spectra;
    the out-of-distribution score on ``data``, thresholded on all validation inputs ``x_val`` [N, 2, n_bins]."""
    temperature, calibration = fit_probabilities(real_logits, y_real)
    return temperature, replace(calibration, ood=fit_ood(data, x_val[:, 0]))


def object_folds(objects: np.ndarray, seed: int = 0) -> np.ndarray:
    """0/1 per row, whole objects on one side: for cross-fitting calibration on validation."""
    names = sorted(set(objects.tolist()))
    side = dict(zip(names, np.random.default_rng(seed).permutation(len(names)) % 2))
    return np.array([side[o] for o in objects])


def calibrate(model: str | Path, out: str | Path, *, data_manifest: str | Path = "../shared/data/manifest.csv",
              max_train: int = 6000, version: str | None = None) -> Checkpoint:
    """``model`` with its calibration (temperature, class bias, purity thresholds, out-of-distribution score) fitted
    again, written to ``out`` as ``version`` (default: the model's own)."""
    torch.set_num_threads(2)
    ckpt = load_checkpoint(model)
    net = ckpt.build_model().eval()
    # 1. data: the checkpoint's own split
    train, val, galaxies, _ = load_split(TrainConfig.from_checkpoint(ckpt.extra, manifest=str(data_manifest)))
    val, n_leaked = drop_leaked(train, val)
    # 2. sets
    data = ood_data(train, galaxies, ckpt.preprocess, data_manifest, max_train=max_train)
    sets = evaluation_sets(val, galaxies, ckpt.preprocess)
    x_val = np.concatenate([s.x for s in sets.values()])
    y_val = np.concatenate([s.y for s in sets.values()])
    # 3. fit
    real = sets["real-degraded"]
    engine = final_engine(ckpt, validation_template_bank(data_manifest, ckpt.preprocess.grid, val))
    temperature, calibration = fit_calibration(data, x_val, engine.outputs(real.x).logits, real.y)
    # 4. write
    extra = {**ckpt.extra, "calibration_fit": {
        "n_train_spectra": int(len(data.transients)), "n_validation_spectra": int(len(y_val)),
        "probabilities_fitted_on": f"real-degraded ({len(real.y)} spectra), logits as the daemon computes them "
                                   f"(refined z, classified again where it moved; bank without validation objects: "
                                   f"{'yes' if engine.templates is not None else 'no bank'})",
        "validation_spectra_dropped_as_leaked": n_leaked,
        "sets": {k: int(len(v.y)) for k, v in sets.items()},
        "n_non_transient_simulations": int(len(data.templates)),
        "n_real_non_transient_draws": int(len(data.real.y)),
        "n_real_non_transient_objects": len(set(data.real.objects.tolist())),
        "ood_quantile": OOD_QUANTILE, "ood_l2": OOD_L2}}
    return save_derived(ckpt, net, out, version=version, temperature=temperature, calibration=calibration,
                        extra=extra)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="trained checkpoint (path without suffix)")
    ap.add_argument("--out", required=True, help="folder for the calibrated checkpoint")
    ap.add_argument("--data-manifest", default="../shared/data/manifest.csv")
    ap.add_argument("--version", help="version of the written checkpoint (default: the model's; a shipped model "
                                      "whose calibration changes gets a new one)")
    args = ap.parse_args(argv)
    ckpt = calibrate(args.model, args.out, data_manifest=args.data_manifest, version=args.version)
    print(json.dumps({"temperature": ckpt.temperature, "class_bias": ckpt.calibration.class_bias,
                      "thresholds": ckpt.calibration.thresholds,
                      "ood_threshold": None if ckpt.calibration.ood is None else ckpt.calibration.ood.threshold},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
