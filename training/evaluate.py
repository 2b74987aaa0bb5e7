"""``spectranet evaluate --model M [--manifest CSV]``: metrics JSON and figures, SpectraNet beside a SNID-style
baseline.

Without ``--manifest`` the evaluation set is the object-held-out validation split of the shared data, simulated at
SEDM resolution with the same fixed seed training used (so these are the numbers early stopping and the temperature
saw), plus the real SEDM spectra among the validation objects, scored as they are. With ``--manifest`` it is the
user's own files (``path, type, redshift[, phase]``), read and preprocessed exactly as ``spectranet classify`` does.

For the two-network model the classifier is also scored on the rest frame of the true redshift
(``classifier_given_true_z``): the gap to its score at its own redshift is what the redshift errors cost.

Both predictors see identical inputs; the baseline's templates are the training split's spectra (never validation
objects). Written to ``--out``: ``metrics.json``, ``confusion.png``, ``confusion_baseline.png``, ``redshift.png``,
``pr.png``, ``reliability.png``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from spectranet.streamer.contract.readers import prepare_file, read_spectrum
from spectranet.streamer.errors import SpectraNetError
from spectranet.streamer.science.checkpoint import Checkpoint, load_checkpoint
from spectranet.streamer.science.preprocess import remove_continuum
from spectranet.streamer.science.taxonomy import CLASSES
from spectranet.training import figures
from spectranet.training import metrics as M
from spectranet.training.baseline import build_bank, match
from spectranet.training.data import Spectrum, read_labelled_entries
from spectranet.training.train import TrainConfig, load_split, predict, simulate_set

__all__ = ["TARGETS", "evaluate", "score", "targets_met"]

# Issue 4's targets on the object-held-out validation set at SEDM resolution: (metric path, comparison, value).
TARGETS: dict[str, tuple[str, float]] = {
    "ia_vs_non_ia_accuracy": (">=", 0.95),
    "h_rich_vs_h_poor_accuracy": (">=", 0.90),
    "macro_f1": (">=", 0.70),
    "z_rms": ("<=", 0.02),
    "z_outlier_fraction": ("<=", 0.03),
}


def _headline(report: dict[str, Any]) -> dict[str, float]:
    return {"ia_vs_non_ia_accuracy": report["ia_vs_non_ia_accuracy"],
            "h_rich_vs_h_poor_accuracy": report["h_rich_vs_h_poor_accuracy"],
            "macro_f1": report["macro_f1"], "accuracy": report["accuracy"],
            "z_rms": report["redshift"]["rms"], "z_nmad": report["redshift"]["nmad"],
            "z_outlier_fraction": report["redshift"]["outlier_fraction"]}


def targets_met(headline: dict[str, float]) -> dict[str, bool]:
    """Which of issue 4's targets a set of headline metrics meets (nan never meets one)."""
    out = {}
    for key, (op, value) in TARGETS.items():
        v = headline.get(key, math.nan)
        out[key] = bool(v >= value) if op == ">=" else bool(v <= value)
    return out


def score(y: np.ndarray, probs: np.ndarray, z_pred: np.ndarray, z_true: np.ndarray) -> dict[str, Any]:
    """Classification report plus redshift statistics over the spectra with a known redshift."""
    report = M.classification_report(y, probs, CLASSES)
    known = np.isfinite(z_true)
    report["redshift"] = M.redshift_stats(z_pred[known], z_true[known])
    return report


def _real_inputs(files: list[tuple[str, str, float | None]], ckpt: Checkpoint
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Real spectrum files through the inference preprocessing: (x [N, 2, L], y [N], z [N] (nan: unknown), paths)."""
    xs, ys, zs, kept = [], [], [], []
    for path, label, z in files:
        try:
            p = prepare_file(read_spectrum(path), ckpt.preprocess)
        except SpectraNetError:
            continue
        xs.append(p.model_input())
        ys.append(CLASSES.index(label))
        zs.append(math.nan if z is None else z)
        kept.append(path)
    if not xs:
        return np.zeros((0, 2, ckpt.model_config.n_bins), np.float32), np.zeros(0, int), np.zeros(0), []
    return np.stack(xs), np.array(ys), np.array(zs, float), kept


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


def _evaluate_set(name: str, x: np.ndarray, y: np.ndarray, z: np.ndarray, ckpt: Checkpoint, model: torch.nn.Module,
                  bank: Any, out: Path, figures_too: bool) -> dict[str, Any]:
    pred = predict(model, x, torch.device("cpu"))
    probs_raw = M.softmax(pred["logits"])
    probs = M.softmax(pred["logits"], ckpt.temperature)
    result: dict[str, Any] = {"n": int(len(y)), "model": score(y, probs, pred["z"], z)}
    result["model"]["ece_before_temperature"] = M.expected_calibration_error(probs_raw, y)
    result["model"]["ece_after_temperature"] = M.expected_calibration_error(probs, y)
    result["model"]["temperature"] = ckpt.temperature
    if ckpt.model_config.two_networks and np.isfinite(z).any():
        # the same classifier on the rest frame of the true z: what the redshift network's errors cost it
        given = M.classification_report(y, M.softmax(predict(model, x, torch.device("cpu"), z=z)["logits"],
                                                     ckpt.temperature), CLASSES)
        result["model"]["classifier_given_true_z"] = {k: given[k] for k in (
            "macro_f1", "accuracy", "ia_vs_non_ia_accuracy", "h_rich_vs_h_poor_accuracy")}
    z_preds = {"SpectraNet": pred["z"]}
    if bank is not None:
        cls, zb, _ = match(bank, _continuum_removed(x, ckpt), x[:, 1])
        result["baseline"] = score(y, np.eye(len(CLASSES))[cls], zb, z)
        z_preds["template matcher"] = zb
    if figures_too:
        figures.plot_confusion(np.array(result["model"]["confusion_matrix"]), CLASSES, out / "confusion.png",
                               f"SpectraNet, {name}")
        if bank is not None:
            figures.plot_confusion(np.array(result["baseline"]["confusion_matrix"]), CLASSES,
                                   out / "confusion_baseline.png", f"template matcher, {name}")
        known = np.isfinite(z)
        figures.plot_redshift(z[known], {k: v[known] for k, v in z_preds.items()}, out / "redshift.png")
        figures.plot_pr(y, probs, CLASSES, out / "pr.png")
        figures.plot_reliability(probs_raw, probs, y, out / "reliability.png")
    return result


def evaluate(*, model: str | Path | None, manifest: str | Path | None = None,
             data_manifest: str | Path = "../shared/data/manifest.csv", out_dir: str | Path = "runs/evaluate",
             baseline: bool = True, max_templates: int = 600) -> dict[str, Any]:
    """Score ``model`` (the shipped one when None) and the baseline; write metrics.json and PNGs to ``out_dir``."""
    torch.set_num_threads(2)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(model)
    net = ckpt.build_model().eval()
    known = TrainConfig.__dataclass_fields__
    tc = {k: v for k, v in ckpt.extra.get("train_config", {}).items() if k in known}
    tcfg = TrainConfig(**{**tc, "manifest": str(data_manifest)})
    train, val, galaxies, _ = load_split(tcfg)
    bank = build_bank(_bank_templates(train, max_templates), ckpt.preprocess) if baseline else None

    report: dict[str, Any] = {"checkpoint": {"name": ckpt.name, "version": ckpt.version, "sha256": ckpt.weights_sha256},
                              "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
                              "baseline": {"method": "SNID-style cross-correlation (r x lap), best template",
                                           "n_templates": 0 if bank is None else int(len(bank.labels))}}
    if manifest is None:
        x, y, z = simulate_set(val, galaxies, ckpt.preprocess, repeats=tcfg.val_repeats, seed=tcfg.val_seed)
        main_name = "validation, simulated SEDM"
        report["sets"] = {main_name: _evaluate_set(main_name, x, y, z, ckpt, net, bank, out, True)}
        sedm = sorted({(s.path, s.label, s.redshift) for s in val if "SEDM" in s.instrument.upper()})
        xr, yr, zr, _ = _real_inputs([(p, lab, zz) for p, lab, zz in sedm], ckpt)
        if len(yr):
            report["sets"]["validation, real SEDM spectra"] = _evaluate_set("real SEDM", xr, yr, zr, ckpt, net, bank,
                                                                            out, False)
    else:
        entries = read_labelled_entries(manifest)
        x, y, z, _ = _real_inputs([(str(e.path), e.label, e.redshift) for e in entries if e.label], ckpt)
        if not len(y):
            raise SpectraNetError(f"{manifest}: no readable, labelled spectra to evaluate")
        main_name = f"manifest {Path(manifest).name}"
        report["sets"] = {main_name: _evaluate_set(main_name, x, y, z, ckpt, net, bank, out, True)}

    main = report["sets"][main_name]
    summary: dict[str, Any] = {"set": main_name, "n": main["n"], "SpectraNet": _headline(main["model"])}
    summary["SpectraNet_meets_target"] = targets_met(summary["SpectraNet"])
    if "classifier_given_true_z" in main["model"]:
        summary["SpectraNet_classifier_given_true_z"] = main["model"]["classifier_given_true_z"]
    summary["ece"] = {"before": main["model"]["ece_before_temperature"],
                      "after": main["model"]["ece_after_temperature"], "temperature": ckpt.temperature}
    if "baseline" in main:
        summary["baseline"] = _headline(main["baseline"])
        summary["SpectraNet_beats_baseline"] = {
            k: bool(summary["SpectraNet"][k] < summary["baseline"][k]) if k.startswith("z_")
            else bool(summary["SpectraNet"][k] > summary["baseline"][k]) for k in TARGETS}
    report["summary"] = summary
    (out / "metrics.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    return report
