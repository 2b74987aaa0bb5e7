"""Calls an astronomer can act on: per-class decision thresholds and an out-of-distribution distance.

The softmax temperature lives on the checkpoint (``Checkpoint.temperature``); this module holds the rest, all fitted
offline (``spectranet.training.calibrate``) and stored in the checkpoint's card under ``"calibration"`` so that the
daemon, ``spectranet classify`` and the evaluation apply exactly the same rule:

- the calibrated probabilities themselves, ``softmax(logits / T + b)``: ``class_bias`` ``b`` (one logit offset per
  class, fitted with T on real validation spectra) puts back the class frequencies that the class-balanced training
  loss takes out (its prior is close to uniform; real spectra are half Ia). Measured on 0.4.0, cross-fitted by object
  halves of the real-degraded validation set, on the network's own logits: H-rich vs H-poor 0.784 -> 0.858, ECE
  0.057 -> 0.027, Ia vs non-Ia 0.824 -> 0.830 against the temperature alone. ``Calibration.probabilities`` is the
  one home of the formula; the fit and its regularisation: ``spectranet.training.metrics.fit_temperature_and_bias``;

and two decisions on top of them:

- ``confident``: the top class's calibrated probability is at least that class's threshold, chosen on validation as the
  lowest probability at which the class's calls reach a target purity (for Ia, 99%: the SNIascore convention).
- ``out_of_distribution``: the spectrum is not a transient of the taxonomy (an M dwarf, a galaxy, an AGN): a linear
  score on the input flux, fitted with outlier exposure, above a threshold set on in-taxonomy validation spectra
  (``OutOfDistribution``). Entropy alone cannot do this: an M dwarf can look confidently like a SN II to a softmax.

Pure numpy at inference: no torch, no I/O (the fit uses scikit-learn, a training-time dependency).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from spectranet.streamer.errors import CheckpointError

__all__ = ["OutOfDistribution", "Calibration", "fit_out_of_distribution", "purity_thresholds"]


@dataclass(frozen=True, eq=False)
class OutOfDistribution:
    """A linear "not a transient" score on the model's input flux channel (continuum-removed, observer frame).

    Fitted offline with outlier exposure: transients of the training split against the non-transient templates
    (M and carbon stars, galaxies, AGN/QSO) simulated at SEDM resolution and, from 0.9.4, the real non-transient
    spectra (M dwarfs, galaxies, an AGN) degraded to SEDM (``spectranet.training.calibrate``: 66 of 70 flagged
    cross-fitted by object, against 62 with the templates alone). Stars sit at z = 0 and their molecular bands
    at fixed observed wavelengths, which a linear model on the observed-frame input sees directly; the classifier's
    own features do not separate them (measured: a Mahalanobis distance on them flagged 0 of 70 real M dwarfs,
    galaxies and AGN at 4% of validation transients flagged).

    Bins the fitting inputs never covered (the simulated SEDM pixels end near 3740 and 9340 A; real SEDM spectra can
    reach 3500-10000 A) carry no weight, and standardised inputs are clipped to +-``clip``: before both (0.4.0-0.8.1)
    the 1e-6 scale of a never-covered bin made any real flux there a huge score, and 10 of the 41 real SEDM
    validation spectra (all Ia and II) were flagged as not transients.
    """

    mean: np.ndarray      # [n_bins] input standardisation
    scale: np.ndarray     # [n_bins]
    weights: np.ndarray   # [n_bins] logistic-regression weights (0 on bins the fit never saw covered)
    bias: float
    threshold: float      # scores above this are out of distribution
    clip: float = math.inf  # standardised inputs are clipped to +-clip (inf: models fitted before the clip existed)

    def score(self, flux: np.ndarray) -> np.ndarray:
        """[B] probability-like score in (0, 1) of normalised input flux [B, n_bins] being a non-transient."""
        u = np.clip((np.asarray(flux, dtype=np.float64) - self.mean) / self.scale, -self.clip, self.clip)
        scores: np.ndarray = 1.0 / (1.0 + np.exp(-(u @ self.weights + self.bias)))
        return scores

    def flag(self, flux: np.ndarray) -> np.ndarray:
        return self.score(flux) > self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {"method": "logistic-on-input-flux", "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "weights": self.weights.tolist(), "bias": float(self.bias), "threshold": float(self.threshold),
                **({} if math.isinf(self.clip) else {"clip": float(self.clip)})}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OutOfDistribution:
        try:
            out = cls(mean=np.asarray(d["mean"], dtype=np.float64), scale=np.asarray(d["scale"], dtype=np.float64),
                      weights=np.asarray(d["weights"], dtype=np.float64), bias=float(d["bias"]),
                      threshold=float(d["threshold"]), clip=float(d.get("clip", math.inf)))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"invalid out-of-distribution model in the card: {exc!r}") from exc
        if not (out.mean.shape == out.scale.shape == out.weights.shape) or out.mean.ndim != 1:
            raise CheckpointError("out-of-distribution model in the card has inconsistent shapes")
        if not out.clip > 0:
            raise CheckpointError(f"out-of-distribution clip must be > 0, got {out.clip!r}")
        return out


@dataclass(frozen=True)
class Calibration:
    """The decisions on top of the calibrated probabilities (see the module docstring)."""

    thresholds: dict[str, float] = field(default_factory=dict)      # class -> minimum probability to be confident
    target_purity: dict[str, float] = field(default_factory=dict)   # class -> purity the threshold was chosen for
    ood: OutOfDistribution | None = None
    class_bias: dict[str, float] = field(default_factory=dict)      # class -> logit offset after the temperature

    def probabilities(self, logits: np.ndarray, temperature: float, taxonomy: Sequence[str]) -> np.ndarray:
        """Calibrated class probabilities [B, C] (float64) of logits [B, C] in ``taxonomy`` order:
        ``softmax(logits / temperature + class_bias)``; a class without a bias gets 0."""
        bias = np.array([self.class_bias.get(c, 0.0) for c in taxonomy], dtype=np.float64)
        z = np.asarray(logits, dtype=np.float64) / temperature + bias
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        probs: np.ndarray = e / e.sum(axis=1, keepdims=True)
        return probs

    def confident(self, top_class: str, top_probability: float) -> bool:
        """True when the call reaches its class's purity target; a class without a threshold is never confident."""
        threshold = self.thresholds.get(top_class)
        return threshold is not None and top_probability >= threshold

    def to_dict(self) -> dict[str, Any]:
        return {"thresholds": dict(self.thresholds), "target_purity": dict(self.target_purity),
                "ood": None if self.ood is None else self.ood.to_dict(),
                **({"class_bias": dict(self.class_bias)} if self.class_bias else {})}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Calibration:
        if not d:
            return cls()
        return cls(thresholds={k: float(v) for k, v in (d.get("thresholds") or {}).items()},
                   target_purity={k: float(v) for k, v in (d.get("target_purity") or {}).items()},
                   ood=None if d.get("ood") is None else OutOfDistribution.from_dict(d["ood"]),
                   class_bias={k: float(v) for k, v in (d.get("class_bias") or {}).items()})


def fit_out_of_distribution(transients: np.ndarray, non_transients: np.ndarray, *, in_distribution: np.ndarray,
                            quantile: float = 0.96, l2: float = 0.003, clip: float = 5.0,
                            min_std: float = 1e-3) -> OutOfDistribution:
    """Fit the linear score on input flux [N, n_bins] of transients (label 0) and non-transients (label 1), classes
    balanced, L2-regularised (``l2`` is scikit-learn's C); the threshold is the ``quantile`` of the scores of
    ``in_distribution`` flux (in-taxonomy validation spectra), so about 1 - quantile of them are flagged.

    Bins whose fitting inputs vary by less than ``min_std`` (never covered) get weight 0 and scale 1; standardised
    inputs are clipped to +-``clip``. Measured on 0.8.1 (41 real SEDM validation spectra / 1,935 real-degraded /
    70 real non-transients flagged): unclipped with every bin 24.4% / 4.9% / 88.6%; never-covered bins dropped 4.9% /
    4.9% / 88.6%; and clipped at 5: 2.4% / 4.6% / 88.6% (clip 3: the same; 10: 2.4% / 4.7% / 87.1%)."""
    from sklearn.linear_model import LogisticRegression  # training-time only (the [train] extra)

    x = np.concatenate([transients, non_transients]).astype(np.float64)
    y = np.r_[np.zeros(len(transients)), np.ones(len(non_transients))]
    mean, std = x.mean(axis=0), x.std(axis=0)
    seen = std >= min_std
    scale = np.where(seen, std, 1.0)
    u = np.clip((x - mean) / scale, -clip, clip)[:, seen]
    clf = LogisticRegression(C=l2, max_iter=5000, class_weight="balanced").fit(u, y)
    weights = np.zeros(x.shape[1])
    weights[seen] = clf.coef_[0]
    model = OutOfDistribution(mean=mean, scale=scale, weights=weights, bias=float(clf.intercept_[0]), threshold=1.0,
                              clip=clip)
    threshold = float(np.quantile(model.score(in_distribution), quantile))
    return replace(model, threshold=threshold)


def purity_thresholds(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                      targets: Mapping[str, float], *, min_calls: int = 20) -> dict[str, float]:
    """Per class, the lowest top-class probability at which calls of that class reach ``targets[class]`` purity on
    the given (validation) set, counting only spectra whose top class it is. Classes that never reach their target
    with at least ``min_calls`` calls get no threshold (never confident)."""
    probs = np.asarray(probs)
    top = probs.argmax(axis=1)
    p_top = probs.max(axis=1)
    out: dict[str, float] = {}
    for c, name in enumerate(classes):
        if name not in targets:
            continue
        sel = top == c
        if sel.sum() < min_calls:
            continue
        order = np.argsort(-p_top[sel])
        correct = (labels[sel][order] == c).astype(float)
        purity = np.cumsum(correct) / np.arange(1, len(correct) + 1)
        ok = np.flatnonzero((purity >= targets[name]) & (np.arange(1, len(correct) + 1) >= min_calls))
        if ok.size:
            out[name] = float(p_top[sel][order][ok.max()])
    return out
