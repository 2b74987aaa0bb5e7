"""Classification, redshift and calibration metrics: pure numpy functions of labels and predictions.

Labels and predictions are integer class indices into ``classes`` (taxonomy order). Every function here is
deterministic and side-effect free so that it can be checked against small hand-made cases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from spectranet.streamer.science.taxonomy import H_POOR, H_RICH

__all__ = ["H_RICH", "H_POOR", "softmax", "confusion_matrix", "per_class_prf", "macro_f1", "ia_accuracy",
           "h_rich_poor_accuracy", "redshift_stats", "expected_calibration_error", "reliability_bins",
           "fit_temperature", "fit_temperature_and_bias", "precision_recall_curve", "classification_report",
           "h_rich_poor_decision_accuracy", "decision_report"]

def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of [N, C] logits / T."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """[C, C] counts, rows true, columns predicted."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return cm


def per_class_prf(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, f1, support) per class from a confusion matrix; 0 where undefined."""
    tp = np.diag(cm).astype(np.float64)
    pred = cm.sum(axis=0).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, pred, out=np.zeros_like(tp), where=pred > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1, support.astype(np.int64)


def macro_f1(cm: np.ndarray) -> float:
    """Mean F1 over the classes that occur in the truth (classes absent from the evaluation set are not scored)."""
    _, _, f1, support = per_class_prf(cm)
    present = support > 0
    return float(f1[present].mean()) if present.any() else math.nan


def ia_accuracy(y_true: np.ndarray, y_pred: np.ndarray, ia_index: int) -> float:
    """Accuracy of the binary decision Ia vs non-Ia over all spectra."""
    t = np.asarray(y_true) == ia_index
    p = np.asarray(y_pred) == ia_index
    return float(np.mean(t == p)) if t.size else math.nan


def h_rich_poor_accuracy(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> tuple[float, int]:
    """(accuracy, n) of H-rich (II, IIn, IIb) vs H-poor (Ib, Ic, Ic-BL) over the spectra that are one or the other.

    The predicted group is the one with the larger summed probability over its three classes, so the decision
    is defined even when the top class is, say, Ia.
    """
    rich = [classes.index(c) for c in H_RICH]
    poor = [classes.index(c) for c in H_POOR]
    y = np.asarray(y_true)
    keep = np.isin(y, rich + poor)
    if not keep.any():
        return math.nan, 0
    p = np.asarray(probs)[keep]
    pred_rich = p[:, rich].sum(axis=1) > p[:, poor].sum(axis=1)
    return float(np.mean(pred_rich == np.isin(y[keep], rich))), int(keep.sum())


def h_rich_poor_decision_accuracy(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> float:
    """Over the spectra that are H-rich (II, IIn, IIb) or H-poor (Ib, Ic, Ic-BL), the fraction whose predicted class
    is of their group: the question asked of a reported class, so a call outside both groups (say Ia) is wrong.
    (``h_rich_poor_accuracy`` asks it of the probabilities instead.)"""
    rich = [list(classes).index(c) for c in H_RICH]
    poor = [list(classes).index(c) for c in H_POOR]
    y, pred = np.asarray(y_true), np.asarray(y_pred)
    keep = np.isin(y, rich + poor)
    if not keep.any():
        return math.nan
    right = np.where(np.isin(y[keep], rich), np.isin(pred[keep], rich), np.isin(pred[keep], poor))
    return float(right.mean())


def decision_report(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """The questions asked of one reported class per spectrum (the arg-max, or the class called down the tree):
    exact accuracy, macro-F1, Ia vs non-Ia, and H-rich vs H-poor by ``h_rich_poor_decision_accuracy``."""
    y, pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    return {"accuracy": float(np.mean(pred == y)) if y.size else math.nan,
            "macro_f1": macro_f1(confusion_matrix(y, pred, len(classes))),
            "ia_vs_non_ia_accuracy": ia_accuracy(y, pred, list(classes).index("Ia")),
            "h_rich_vs_h_poor_accuracy": h_rich_poor_decision_accuracy(y, pred, classes)}


def redshift_stats(z_pred: np.ndarray, z_true: np.ndarray, outlier: float = 0.15) -> dict[str, float]:
    """RMS and NMAD of dz = (z_pred - z_true) / (1 + z_true), and the fraction with |dz| > ``outlier``."""
    zp, zt = np.asarray(z_pred, np.float64), np.asarray(z_true, np.float64)
    dz = (zp - zt) / (1.0 + zt)
    if dz.size == 0:
        return {"rms": math.nan, "nmad": math.nan, "outlier_fraction": math.nan, "bias": math.nan, "n": 0}
    return {"rms": float(np.sqrt(np.mean(dz**2))),
            "nmad": float(1.4826 * np.median(np.abs(dz - np.median(dz)))),
            "outlier_fraction": float(np.mean(np.abs(dz) > outlier)),
            "bias": float(np.median(dz)), "n": int(dz.size)}


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per confidence bin (equal width on [0, 1]): mean confidence, accuracy and count of the top-class predictions."""
    p = np.asarray(probs, np.float64)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == np.asarray(y_true)).astype(np.float64)
    idx = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    safe = np.maximum(count, 1)
    return {"confidence": np.bincount(idx, conf, n_bins) / safe, "accuracy": np.bincount(idx, correct, n_bins) / safe,
            "count": count}


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """ECE: count-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    b = reliability_bins(probs, y_true, n_bins)
    n = b["count"].sum()
    return float(np.sum(b["count"] * np.abs(b["accuracy"] - b["confidence"])) / n) if n else math.nan


def _nll(logits: np.ndarray, y: np.ndarray, t: float) -> float:
    p = softmax(logits, t)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-300, None))))


def fit_temperature(logits: np.ndarray, y_true: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """Temperature T minimising the NLL of softmax(logits / T): golden-section search in log T (NLL is unimodal)."""
    y = np.asarray(y_true, int)
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = _nll(logits, y, math.exp(a)), _nll(logits, y, math.exp(b))
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = _nll(logits, y, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = _nll(logits, y, math.exp(b))
    return float(math.exp((lo + hi) / 2))


def fit_temperature_and_bias(logits: np.ndarray, y_true: np.ndarray, n_classes: int, *,
                             l2: float = 0.005) -> tuple[float, np.ndarray]:
    """Temperature T and class bias b [n_classes] minimising the mean NLL of softmax(logits / T + b) plus
    ``l2 * |b|^2`` (L-BFGS over log T and b, from T = 1, b = 0). The L2 term keeps classes with few validation
    spectra from being driven out; more of it trades calibration for macro-F1. Measured on 0.4.0's real-degraded
    validation (1,935 spectra), the daemon's final logits (refined z, reclassified where it moved), cross-fitted by
    object halves, mean over 8 random halvings (temperature alone, one halving: macro-F1 0.389, ECE 0.057):

    | l2 | Ia vs non-Ia | H-rich vs H-poor | macro-F1 | ECE |
    |---|---|---|---|---|
    | 0 | 0.838 | 0.851 | 0.376 +- 0.027 | 0.029 +- 0.008 |
    | 0.001 | 0.839 | 0.851 | 0.385 +- 0.025 | 0.029 +- 0.005 |
    | 0.003 | 0.841 | 0.853 | 0.393 +- 0.018 | 0.027 +- 0.004 |
    | **0.005** | 0.843 | 0.850 | 0.408 +- 0.024 | 0.028 +- 0.005 |
    | 0.01 | 0.846 | 0.848 | 0.425 +- 0.006 | 0.036 +- 0.006 |
    | 0.02 | 0.854 | 0.836 | 0.428 +- 0.007 | 0.048 +- 0.005 |

    0.005: the largest whose ECE stays within the 0.03 goal on average."""
    from scipy.optimize import minimize  # training-time only (the [train] extra)

    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true, int)
    rows = np.arange(len(y))

    def objective(p: np.ndarray) -> tuple[float, np.ndarray]:
        t, b = math.exp(p[0]), p[1:]
        z = x / t + b
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        prob = e / e.sum(axis=1, keepdims=True)
        nll = float(-np.mean(np.log(np.clip(prob[rows, y], 1e-300, None))))
        g = prob.copy()
        g[rows, y] -= 1.0
        g /= len(y)                                   # d nll / d z
        grad_b = g.sum(axis=0) + 2.0 * l2 * b
        grad_logt = float(np.sum(g * (-x / t)))       # dz/dlogT = -x / T
        return nll + l2 * float(b @ b), np.r_[grad_logt, grad_b]

    res = minimize(objective, np.zeros(n_classes + 1), jac=True, method="L-BFGS-B",
                   bounds=[(math.log(0.05), math.log(20.0))] + [(None, None)] * n_classes)
    return float(math.exp(res.x[0])), np.asarray(res.x[1:], dtype=np.float64)


def precision_recall_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(precision, recall, average precision) of one-vs-rest scores, thresholds at every distinct score."""
    s = np.asarray(scores, np.float64)
    pos = np.asarray(positive, bool)
    order = np.argsort(-s, kind="stable")
    tp = np.cumsum(pos[order])
    fp = np.cumsum(~pos[order])
    n_pos = pos.sum()
    if n_pos == 0:
        return np.array([1.0]), np.array([0.0]), math.nan
    last = np.r_[np.flatnonzero(np.diff(s[order])), s.size - 1]  # last index of each distinct score
    precision, recall = tp[last] / (tp[last] + fp[last]), tp[last] / n_pos
    ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return precision, recall, ap


def classification_report(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict:
    """Every classification metric the model card reports, from labels and [N, C] probabilities."""
    y = np.asarray(y_true, int)
    pred = np.asarray(probs).argmax(axis=1)
    cm = confusion_matrix(y, pred, len(classes))
    precision, recall, f1, support = per_class_prf(cm)
    hr, n_hr = h_rich_poor_accuracy(y, probs, classes)
    return {
        "n": int(y.size),
        "accuracy": float(np.mean(pred == y)) if y.size else math.nan,
        "macro_f1": macro_f1(cm),
        "ia_vs_non_ia_accuracy": ia_accuracy(y, pred, list(classes).index("Ia")),
        "h_rich_vs_h_poor_accuracy": hr, "h_rich_vs_h_poor_n": n_hr,
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                          "support": int(support[i])} for i, c in enumerate(classes)},
        "confusion_matrix": cm.tolist(),
    }
