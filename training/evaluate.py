"""``spectranet evaluate --model M [--manifest CSV]``: every predictor side by side, per set, per class.

Without ``--manifest`` the evaluation uses the checkpoint's own object-held-out validation split of the shared data,
in three sets scored apart:

- **real-degraded** (the headline): real observed validation spectra at their own redshift, degraded to SEDM (R~100
  line-spread, SEDM pixels, noise, coverage cuts, host light) by ``training.simulate``;
- **simulated**: validation templates at drawn redshifts;
- **real SEDM**: the real SEDM spectra of validation objects, as they are (``prepare_file``, like ``classify``);

plus the real **non-transients** (M dwarfs, galaxies, AGN), scored only for the out-of-distribution flag. With
``--manifest`` the set is the user's own files, read and preprocessed exactly as ``spectranet classify`` does.

Predictors, on identical inputs:

- ``SpectraNet``: the network alone (classes, its redshift network's z);
- ``SpectraNet + templates``: what the daemon outputs (``InferenceEngine.outputs``): the redshift refined by
  template cross-correlation around the network's z (``streamer.science.templates``) with a bank built **without the
  validation objects**, and the classes from the classifier run again at the refined z where it moved;
- ``template matcher``: a SNID-style cross-correlation over training-split spectra (``training.baseline``).

The calibration (temperature, class bias, purity thresholds, out-of-distribution threshold) is fitted on the
real-degraded set (``training.calibrate``), and the class bias moves the top class, so on that set every number that
uses probabilities (accuracies, macro-F1, purity, ECE, the out-of-distribution rate on in-taxonomy spectra) is
cross-fitted: the calibration is refitted on one half of the validation objects and scored on the other half, and
back, so no number is scored on the spectra it was fitted on. The other sets use the checkpoint's calibration as is.

Written to ``--out``: ``metrics.json``, ``confusion.png``, ``confusion_baseline.png``, ``redshift.png``, ``pr.png``,
``reliability.png``, ``purity_completeness.png``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from spectranet.streamer.contract.readers import prepare_file, read_spectrum
from spectranet.streamer.errors import SpectraNetError
from spectranet.streamer.science.calibration import Calibration
from spectranet.streamer.science.checkpoint import Checkpoint, load_checkpoint
from spectranet.streamer.science.inference import RECLASSIFY_SHIFT, InferenceEngine
from spectranet.streamer.science.preprocess import remove_continuum
from spectranet.streamer.science.taxonomy import CLASSES, hierarchical_call
from spectranet.streamer.science.templates import DEFAULT_WINDOW
from spectranet.training import figures
from spectranet.training import metrics as M
from spectranet.training.baseline import build_bank, match
from spectranet.training.calibrate import (
    OOD_FOLDS,
    OOD_QUANTILE,
    EvalSet,
    cross_fitted_non_transients,
    evaluation_sets,
    final_engine,
    fit_probabilities,
    non_transient_set,
    object_folds,
    ood_data,
    run_model,
    validation_template_bank,
)
from spectranet.training.data import Spectrum, drop_leaked, read_labelled_entries
from spectranet.training.train import TrainConfig, load_split

__all__ = ["TARGETS", "evaluate", "score", "targets_met", "ia_purity_at_completeness"]

# Issue 14's goals on the real-degraded validation spectra: (comparison, value).
TARGETS: dict[str, tuple[str, float]] = {
    "ia_vs_non_ia_accuracy": (">=", 0.95),
    "h_rich_vs_h_poor_accuracy": (">=", 0.90),
    "macro_f1": (">=", 0.70),
    "ia_purity_at_90_completeness": (">=", 0.99),
    "z_nmad": ("<=", 0.006),
    "z_outlier_fraction": ("<=", 0.02),
    "ece": ("<=", 0.03),
}
OOD_TARGETS = {"non_transients_flagged": (">=", 0.90), "in_taxonomy_flagged": ("<=", 0.05)}
_IA = CLASSES.index("Ia")


def ia_purity_at_completeness(p_ia: np.ndarray, y: np.ndarray, completeness: float = 0.9) -> float:
    """Purity of the Ia calls when the threshold on p(Ia) is set to recover ``completeness`` of the true Ia."""
    is_ia = np.asarray(y) == _IA
    if not is_ia.any():
        return math.nan
    threshold = np.quantile(np.asarray(p_ia)[is_ia], 1.0 - completeness)
    called = np.asarray(p_ia) >= threshold
    return float(is_ia[called].mean())


def score(y: np.ndarray, probs: np.ndarray, z_pred: np.ndarray, z_true: np.ndarray) -> dict[str, Any]:
    """Classification report, Ia purity at 90% completeness, and redshift statistics where z is known."""
    report = M.classification_report(y, probs, CLASSES)
    report["ia_purity_at_90_completeness"] = ia_purity_at_completeness(probs[:, _IA], y)
    known = np.isfinite(z_true)
    report["redshift"] = M.redshift_stats(z_pred[known], z_true[known])
    return report


def _headline(report: dict[str, Any]) -> dict[str, float]:
    return {"ia_vs_non_ia_accuracy": report["ia_vs_non_ia_accuracy"],
            "h_rich_vs_h_poor_accuracy": report["h_rich_vs_h_poor_accuracy"],
            "macro_f1": report["macro_f1"], "accuracy": report["accuracy"],
            "ia_purity_at_90_completeness": report["ia_purity_at_90_completeness"],
            "z_rms": report["redshift"]["rms"], "z_nmad": report["redshift"]["nmad"],
            "z_outlier_fraction": report["redshift"]["outlier_fraction"],
            **({"ece": report["ece"]} if "ece" in report else {})}


def targets_met(headline: dict[str, float]) -> dict[str, bool]:
    """Which targets a set of headline metrics meets (nan never meets one)."""
    out = {}
    for key, (op, value) in TARGETS.items():
        v = headline.get(key, math.nan)
        out[key] = bool(v >= value) if op == ">=" else bool(v <= value)
    return out


def _beats(a: dict[str, float], b: dict[str, float]) -> dict[str, bool]:
    return {k: bool(a[k] < b[k]) if TARGETS[k][0] == "<=" else bool(a[k] > b[k])
            for k in TARGETS if k in a and k in b}


def _real_inputs(files: list[tuple[str, str | None, float | None]], ckpt: Checkpoint) -> EvalSet:
    """Real spectrum files through the inference preprocessing (label None: not a taxonomy class, y = -1)."""
    xs, ys, zs, kept = [], [], [], []
    for path, label, z in files:
        try:
            p = prepare_file(read_spectrum(path), ckpt.preprocess)
        except SpectraNetError:
            continue
        xs.append(p.model_input())
        ys.append(CLASSES.index(label) if label else -1)
        zs.append(math.nan if z is None else z)
        kept.append(path)
    n_bins = ckpt.preprocess.grid.n_bins
    return EvalSet(x=np.stack(xs) if xs else np.zeros((0, 2, n_bins), np.float32), y=np.array(ys, int),
                   z=np.array(zs, float), objects=np.array(kept), sources=np.array(["file"] * len(kept)))


def _continuum_removed(x: np.ndarray, ckpt: Checkpoint) -> np.ndarray:
    if ckpt.preprocess.normalisation == "continuum":
        return x[:, 0]
    return np.stack([remove_continuum(f, c > 0, ckpt.preprocess.continuum_knots) for f, c in zip(x[:, 0], x[:, 1])])


def _bank_templates(train: list[Spectrum], max_templates: int, seed: int = 0) -> list[Spectrum]:
    """Up to ``max_templates`` training spectra: every class gets an equal share first, the rest at random."""
    rng = np.random.default_rng(seed)
    share = max(1, max_templates // len(CLASSES))
    chosen: list[int] = []
    for cls in CLASSES:
        idx = [i for i, s in enumerate(train) if s.label == cls]
        chosen.extend(rng.permutation(idx)[:share].tolist())
    rest = np.setdiff1d(np.arange(len(train)), chosen)
    chosen.extend(rng.permutation(rest)[:max(0, max_templates - len(chosen))].tolist())
    return [train[i] for i in sorted(chosen)]


def _stacked(s: EvalSet, logits: np.ndarray, match_evidence: np.ndarray) -> np.ndarray:
    """Probabilities of a multinomial logistic stacker on [network logits, matcher class x score], fitted on one half
    of the objects and applied to the other, and back: does the template evidence add to the network's?"""
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([logits, match_evidence], axis=1)
    folds = object_folds(s.objects)
    out = np.full((len(s.y), len(CLASSES)), 1.0 / len(CLASSES))
    for k in (0, 1):
        fit, test = folds != k, folds == k
        present = np.unique(s.y[fit])
        if not test.any() or len(present) < 2:
            continue
        clf = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced").fit(x[fit], s.y[fit])
        out[test] = 0.0
        out[np.ix_(test, present)] = clf.predict_proba(x[test])
    return out


def _cross_fitted(s: EvalSet, logits: np.ndarray, ood_scores: np.ndarray | None, quantile: float) -> dict[str, Any]:
    """Probabilities, ECE, purity of the thresholded calls, and the in-taxonomy out-of-distribution rate, each fitted
    on one half of the objects and scored on the other."""
    probs = np.zeros_like(logits)
    confident = np.zeros(len(s.y), bool)
    flagged = np.zeros(len(s.y), bool)
    for fit, test, fold_probs, calibration in _calibrated_halves(s, logits):
        probs[test] = fold_probs
        thresholds = calibration.thresholds
        top, p_top = probs[test].argmax(axis=1), probs[test].max(axis=1)
        confident[test] = [CLASSES[c] in thresholds and p >= thresholds[CLASSES[c]] for c, p in zip(top, p_top)]
        if ood_scores is not None:
            flagged[test] = ood_scores[test] > np.quantile(ood_scores[fit], quantile)
    pred = probs.argmax(axis=1)
    purity = {c: float((s.y[confident & (pred == i)] == i).mean()) if (confident & (pred == i)).any() else math.nan
              for i, c in enumerate(CLASSES)}
    return {"ece": M.expected_calibration_error(probs, s.y), "probs": probs,
            "confident_fraction": float(confident.mean()), "confident_purity": purity,
            "confident_ia_completeness": float((confident & (pred == _IA))[s.y == _IA].mean())
            if (s.y == _IA).any() else math.nan,
            "in_taxonomy_flagged": float(flagged.mean()) if ood_scores is not None else math.nan,
            "ece_over_halvings": _ece_over_halvings(s, logits)}


def _calibrated_halves(s: EvalSet, logits: np.ndarray, seed: int = 0
                       ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, Calibration]]:
    """Per object half: (fit mask, test mask, the test rows' probabilities under the calibration fitted on the other
    half, that calibration)."""
    folds = object_folds(s.objects, seed=seed)
    for k in (0, 1):
        fit, test = folds != k, folds == k
        if fit.any() and test.any():
            t, calibration = fit_probabilities(logits[fit], s.y[fit])
            yield fit, test, calibration.probabilities(logits[test], t, CLASSES), calibration


def _ece_over_halvings(s: EvalSet, logits: np.ndarray, n: int = 8) -> dict[str, float]:
    """Mean and spread of the cross-fitted ECE over ``n`` random object halvings: one halving's ECE moves by
    ~0.005 with the draw (measured), as much as the differences it is used to judge."""
    eces = []
    for seed in range(n):
        probs = np.zeros_like(logits)
        for _, test, fold_probs, _ in _calibrated_halves(s, logits, seed):
            probs[test] = fold_probs
        eces.append(M.expected_calibration_error(probs, s.y))
    return {"mean": float(np.mean(eces)), "sd": float(np.std(eces)), "n": n}


def _evaluate_set(name: str, s: EvalSet, ckpt: Checkpoint, net: torch.nn.Module, baseline: Any,
                  engine: InferenceEngine, out: Path, figures_too: bool, fitted_here: bool) -> dict[str, Any]:
    """Every predictor on one set: the network alone (its logits and redshift), ``engine`` (the daemon's inference
    with the template bank: refined z, classified again where it moved), the template matcher, the stacker.
    ``fitted_here``: the checkpoint's calibration (temperature, class bias, thresholds, out-of-distribution threshold)
    was fitted on this very set, so every probability-based number is cross-fitted by object halves instead of using
    the shipped calibration."""
    o = run_model(net, s.x)
    final = engine.outputs(s.x)
    ood = ckpt.calibration.ood
    ood_scores = None if ood is None else ood.score(s.x[:, 0])
    fitted = fitted_here and len(s.y) >= 20
    cross = _cross_fitted(s, final.logits, ood_scores, OOD_QUANTILE) if fitted else None
    probs_net = _cross_fitted(s, o.logits, None, OOD_QUANTILE)["probs"] if fitted else ckpt.probabilities(o.logits)
    shipped = ckpt.probabilities(final.logits)
    probs = shipped if cross is None else cross["probs"]
    result: dict[str, Any] = {"n": int(len(s.y)), "sources": {k: int(v) for k, v in
                                                              zip(*np.unique(s.sources, return_counts=True))},
                              "probabilities": "cross-fitted by object halves" if cross is not None
                              else "the checkpoint's calibration"}
    result["model"] = {**score(s.y, probs_net, o.z, s.z), "ece": M.expected_calibration_error(probs_net, s.y),
                       "note": "the network alone: its logits and its redshift"}
    result["model_refined"] = {
        **score(s.y, probs, final.z, s.z), "ece": M.expected_calibration_error(probs, s.y),
        "ece_shipped_calibration": M.expected_calibration_error(shipped, s.y),
        "template_fraction": float(np.mean(final.refinement.method == "template"))
        if final.refinement is not None and len(s.y) else 0.0,
        "reclassified_fraction": float(final.reclassified.mean()) if len(s.y) else 0.0,
        "note": "what the daemon outputs: template-refined z, classes at it where it moved"}
    result["model_refined"]["decisions"] = {
        "top_class": M.decision_report(s.y, probs.argmax(axis=1), CLASSES),
        "called_class": M.decision_report(s.y, hierarchical_call(probs, CLASSES), CLASSES),
        "note": "one reported class per spectrum: the most probable (top_class) or the one called down the "
                "taxonomy's tree (called_class); H-rich vs H-poor counts a class outside both groups as wrong"}
    if cross is not None:
        result["model_refined"]["calibration_cross_fitted"] = {k: v for k, v in cross.items() if k != "probs"}
    if ood is not None:
        result["model_refined"]["out_of_distribution_flagged"] = float(final.out_of_distribution.mean())
    result["model_refined"]["temperature"] = ckpt.temperature
    if ckpt.model_config.two_networks and np.isfinite(s.z).all() and len(s.y):
        # the same classifier on the rest frame of the true z: what the redshift errors cost it
        given = M.classification_report(s.y, ckpt.probabilities(run_model(net, s.x, z=s.z).logits), CLASSES)
        result["model_refined"]["classifier_given_true_z"] = {k: given[k] for k in (
            "macro_f1", "accuracy", "ia_vs_non_ia_accuracy", "h_rich_vs_h_poor_accuracy")}
    z_preds = {"SpectraNet": o.z, "SpectraNet + templates": final.z}
    if baseline is not None and len(s.y):
        cls, zb, match_score = match(baseline, _continuum_removed(s.x, ckpt), s.x[:, 1])
        onehot = np.eye(len(CLASSES))[cls]
        result["baseline"] = score(s.y, onehot, zb, s.z)
        result["baseline"]["ece"] = M.expected_calibration_error(onehot, s.y)
        result["baseline"]["decisions"] = {"top_class": M.decision_report(s.y, cls, CLASSES)}
        z_preds["template matcher"] = zb
        if len(s.y) >= 100:
            stacked = _stacked(s, final.logits, onehot * match_score[:, None])
            result["stacked"] = {**score(s.y, stacked, final.z, s.z),
                                 "ece": M.expected_calibration_error(stacked, s.y),
                                 "note": "logistic stacker on the final logits and the matcher's class x score, "
                                         "cross-fitted by object halves; measured, not shipped"}
    if figures_too:
        figures.plot_confusion(np.array(result["model_refined"]["confusion_matrix"]), CLASSES,
                               out / "confusion.png", f"SpectraNet, {name}")
        if "baseline" in result:
            figures.plot_confusion(np.array(result["baseline"]["confusion_matrix"]), CLASSES,
                                   out / "confusion_baseline.png", f"template matcher, {name}")
        known = np.isfinite(s.z)
        figures.plot_redshift(s.z[known], {k: v[known] for k, v in z_preds.items()}, out / "redshift.png")
        figures.plot_pr(s.y, probs, CLASSES, out / "pr.png")
        figures.plot_reliability(M.softmax(final.logits), probs, s.y, out / "reliability.png")
        figures.plot_purity_completeness(probs[:, _IA], s.y == _IA, out / "purity_completeness.png",
                                         "Ia: purity vs completeness, " + name)
    return result


def evaluate(*, model: str | Path | None, manifest: str | Path | None = None,
             data_manifest: str | Path = "../shared/data/manifest.csv", out_dir: str | Path = "runs/evaluate",
             baseline: bool = True, max_templates: int = 600) -> dict[str, Any]:
    """Score ``model`` (the shipped one when None) and the baselines; write metrics.json and PNGs to ``out_dir``."""
    torch.set_num_threads(2)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(model)
    net = ckpt.build_model().eval()
    train, val, galaxies, _ = load_split(TrainConfig.from_checkpoint(ckpt.extra, manifest=str(data_manifest)))
    val, n_leaked = drop_leaked(train, val)
    base_bank = build_bank(_bank_templates(train, max_templates), ckpt.preprocess) if baseline else None
    refine_bank = validation_template_bank(data_manifest, ckpt.preprocess.grid, val)
    engine = final_engine(ckpt, refine_bank)

    report: dict[str, Any] = {
        "checkpoint": {"name": ckpt.name, "version": ckpt.version, "sha256": ckpt.weights_sha256},
        "targets": {k: f"{op} {v}" for k, (op, v) in {**TARGETS, **OOD_TARGETS}.items()},
        "baseline": {"method": "SNID-style cross-correlation (r x lap), best template of the training split",
                     "n_templates": 0 if base_bank is None else int(len(base_bank.labels))},
        "refinement": {"method": f"template cross-correlation within {DEFAULT_WINDOW} in ln(1+z) of the network's "
                                 f"z, templates of its two most likely classes; classified again at the refined z "
                                 f"where it moved >= {RECLASSIFY_SHIFT} in ln(1+z)",
                       "n_templates": 0 if refine_bank is None else int(len(refine_bank.objects)),
                       "excluded_validation_objects": len({s.object_id for s in val})},
        "validation_spectra_dropped_as_leaked": n_leaked}
    sets: dict[str, Any] = {}
    if manifest is None:
        for name, s in evaluation_sets(val, galaxies, ckpt.preprocess).items():
            if len(s.y):
                sets[name] = (s, False)
        sedm = sorted({(s.path, s.label, s.redshift) for s in val if s.source == "sedm"})
        real_sedm = _real_inputs(list(sedm), ckpt)
        if len(real_sedm.y):
            sets["real SEDM"] = (real_sedm, False)
        main_name = "real-degraded" if "real-degraded" in sets else next(iter(sets))
    else:
        entries = read_labelled_entries(manifest)
        s = _real_inputs([(str(e.path), e.label, e.redshift) for e in entries if e.label], ckpt)
        if not len(s.y):
            raise SpectraNetError(f"{manifest}: no readable, labelled spectra to evaluate")
        main_name = f"manifest {Path(manifest).name}"
        sets[main_name] = (s, False)
    sets[main_name] = (sets[main_name][0], True)
    fitted_on = "real-degraded" if manifest is None else None  # where training.calibrate fits the calibration
    report["sets"] = {name: _evaluate_set(name, s, ckpt, net, base_bank, engine, out, figs, name == fitted_on)
                      for name, (s, figs) in sets.items()}

    main = report["sets"][main_name]
    summary: dict[str, Any] = {"set": main_name, "n": main["n"], "SpectraNet": _headline(main["model"]),
                               "SpectraNet + templates": _headline(main["model_refined"])}
    summary["SpectraNet_meets_target"] = targets_met(summary["SpectraNet + templates"])
    if "classifier_given_true_z" in main["model_refined"]:
        summary["SpectraNet_classifier_given_true_z"] = main["model_refined"]["classifier_given_true_z"]
    summary["ece"] = {"cross_fitted": main["model_refined"]["ece"],
                      "cross_fitted_over_halvings": main["model_refined"].get("calibration_cross_fitted", {}).get(
                          "ece_over_halvings"),
                      "shipped_calibration_on_its_fitting_set": main["model_refined"]["ece_shipped_calibration"],
                      "temperature": ckpt.temperature, "class_bias": ckpt.calibration.class_bias}
    summary["decisions"] = {"SpectraNet + templates": main["model_refined"]["decisions"],
                            **({"baseline": main["baseline"]["decisions"]} if "baseline" in main else {})}
    if "baseline" in main:
        summary["baseline"] = _headline(main["baseline"])
        summary["SpectraNet_beats_baseline"] = _beats(summary["SpectraNet + templates"], summary["baseline"])
    if manifest is None and ckpt.calibration.ood is not None:
        nt = non_transient_set(data_manifest, galaxies, ckpt.preprocess)
        cross = main["model_refined"].get("calibration_cross_fitted", {})
        shipped_flags = ckpt.calibration.ood.flag(nt.x[:, 0])
        fitted_on_them = ckpt.extra.get("calibration_fit", {}).get("n_real_non_transient_draws", 0) > 0
        flags = shipped_flags
        if fitted_on_them and len(nt.y):  # the shipped score has seen them: refit without each fold's objects
            x_val = np.concatenate([s.x[:, 0] for s in evaluation_sets(val, galaxies, ckpt.preprocess).values()])
            flags = cross_fitted_non_transients(ood_data(train, galaxies, ckpt.preprocess, data_manifest), nt, x_val)
        summary["out_of_distribution"] = {
            "non_transients_flagged": float(flags.mean()) if len(nt.y) else math.nan,
            "non_transients_flagged_how": (f"cross-fitted: scores refitted without the objects of each of "
                                           f"{OOD_FOLDS} folds" if fitted_on_them else "shipped score (not fitted "
                                           "on them)"),
            "non_transients_missed": sorted(set(nt.objects[~flags].tolist())),
            "non_transients_flagged_shipped_score": float(shipped_flags.mean()) if len(nt.y) else math.nan,
            "n_non_transients": int(len(nt.y)),
            "in_taxonomy_flagged": cross.get("in_taxonomy_flagged", math.nan),
            "in_taxonomy_flagged_shipped_threshold": main["model_refined"].get("out_of_distribution_flagged",
                                                                                math.nan),
            "real_sedm_flagged": report["sets"].get("real SEDM", {}).get("model_refined", {}).get(
                "out_of_distribution_flagged", math.nan)}
    report["summary"] = summary
    (out / "metrics.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    return report
