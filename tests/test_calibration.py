"""Purity thresholds, the out-of-distribution score, and their round trip through a checkpoint card."""

from __future__ import annotations

import numpy as np
import pytest
from spectranet.streamer.errors import CheckpointError
from spectranet.streamer.science.calibration import (
    Calibration,
    OutOfDistribution,
    fit_out_of_distribution,
    purity_thresholds,
)
from spectranet.streamer.science.checkpoint import load_checkpoint, save_checkpoint

CLASSES = ("A", "B")


def test_purity_threshold_is_the_lowest_probability_that_reaches_the_target() -> None:
    # 100 calls of A with probabilities 0.99 .. 0.50; the 10 least confident are wrong
    p = np.linspace(0.99, 0.50, 100)
    probs = np.stack([p, 1 - p], axis=1)
    labels = np.r_[np.zeros(90, int), np.ones(10, int)]
    got = purity_thresholds(probs, labels, CLASSES, {"A": 0.99})
    assert got["A"] == pytest.approx(p[89])  # all 90 right calls, none of the wrong ones
    purity_at = (labels[p >= got["A"]] == 0).mean()
    assert purity_at >= 0.99
    # a lower target admits some wrong calls: purity 0.95 allows 4 of the 10 wrong ones
    assert purity_thresholds(probs, labels, CLASSES, {"A": 0.95})["A"] == pytest.approx(p[93])


def test_a_class_that_never_reaches_its_target_gets_no_threshold_and_is_never_confident() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0.5, 1.0, 200)
    probs = np.stack([p, 1 - p], axis=1)
    labels = rng.integers(0, 2, 200)  # coin flips: purity ~0.5 at every threshold
    got = purity_thresholds(probs, labels, CLASSES, {"A": 0.99})
    assert "A" not in got
    cal = Calibration(thresholds=got)
    assert not cal.confident("A", 0.999)
    assert Calibration(thresholds={"A": 0.8}).confident("A", 0.8)
    assert not Calibration(thresholds={"A": 0.8}).confident("A", 0.79)


def _bands(n: int, rng: np.random.Generator, centre: int) -> np.ndarray:
    x = rng.normal(0, 0.3, (n, 64))
    x[:, centre - 2:centre + 3] -= 2.0  # an absorption band at a fixed observed position
    return x


def test_out_of_distribution_flags_the_kind_it_was_fitted_against_and_few_others() -> None:
    rng = np.random.default_rng(1)
    transients = rng.normal(0, 1, (2000, 64))
    stars = _bands(400, rng, 40)
    held_in = rng.normal(0, 1, (1000, 64))
    ood = fit_out_of_distribution(transients, stars, in_distribution=held_in, quantile=0.96, l2=0.1)
    assert ood.flag(held_in).mean() == pytest.approx(0.04, abs=0.005)  # the threshold's definition
    assert ood.flag(_bands(200, rng, 40)).mean() > 0.9                   # new stars of the same kind
    assert ood.flag(rng.normal(0, 1, (1000, 64))).mean() < 0.08          # new transients


def test_out_of_distribution_ignores_bins_its_fitting_inputs_never_covered() -> None:
    """The simulated SEDM pixels never reach the grid's ends, real SEDM spectra can: flux there must not make a
    transient an outlier (0.4.0-0.8.1 flagged 10 of 41 real SEDM spectra through a 1e-6 scale)."""
    rng = np.random.default_rng(3)
    transients, stars, held_in = rng.normal(0, 1, (2000, 64)), _bands(400, rng, 40), rng.normal(0, 1, (1000, 64))
    for x in (transients, stars, held_in):
        x[:, -4:] = 0.0  # never covered while fitting
    ood = fit_out_of_distribution(transients, stars, in_distribution=held_in, quantile=0.96, l2=0.1)
    assert np.all(ood.weights[-4:] == 0.0) and np.all(ood.scale[-4:] == 1.0)
    new = rng.normal(0, 1, (1000, 64))  # transients whose spectra cover the whole grid
    assert ood.flag(new).mean() < 0.08
    assert ood.flag(_bands(200, rng, 40)).mean() > 0.9


def test_out_of_distribution_clips_standardised_inputs() -> None:
    n = 8
    ood = OutOfDistribution(mean=np.zeros(n), scale=np.full(n, 0.1), weights=np.full(n, 1.0), bias=0.0,
                            threshold=0.5, clip=2.0)
    one_wild_bin = np.zeros((1, n))
    one_wild_bin[0, 0] = -1e6  # a glitch 10^7 scales away moves the logit by clip * weight, no more
    assert ood.score(one_wild_bin)[0] == pytest.approx(1 / (1 + np.exp(2.0)))
    assert OutOfDistribution.from_dict(ood.to_dict()).clip == 2.0
    legacy = {k: v for k, v in ood.to_dict().items() if k != "clip"}  # cards written before the clip existed
    assert OutOfDistribution.from_dict(legacy).clip == np.inf
    with pytest.raises(CheckpointError, match="clip"):
        OutOfDistribution.from_dict({**ood.to_dict(), "clip": 0.0})


def test_calibration_round_trips_through_a_checkpoint_card(tmp_path) -> None:
    shipped = load_checkpoint()
    rng = np.random.default_rng(2)
    n = shipped.model_config.n_bins
    ood = OutOfDistribution(mean=rng.normal(size=n), scale=rng.uniform(0.5, 2, n), weights=rng.normal(size=n),
                            bias=0.3, threshold=0.7)
    cal = Calibration(thresholds={"Ia": 0.91}, target_purity={"Ia": 0.99}, ood=ood, class_bias={"Ia": 0.8, "II": -0.2})
    saved = save_checkpoint(shipped.build_model(), tmp_path / "m-9.9.9", name="m", version="9.9.9",
                            taxonomy=shipped.taxonomy, preprocess=shipped.preprocess, temperature=1.3, calibration=cal)
    loaded = load_checkpoint(tmp_path / "m-9.9.9")
    assert loaded.temperature == 1.3 and loaded.calibration.thresholds == {"Ia": 0.91}
    assert loaded.calibration.target_purity == {"Ia": 0.99}
    x = rng.normal(size=(5, n))
    assert loaded.calibration.ood is not None
    np.testing.assert_allclose(loaded.calibration.ood.score(x), ood.score(x))
    assert saved.card()["calibration"]["ood"]["method"] == "logistic-on-input-flux"
    assert loaded.calibration.class_bias == {"Ia": 0.8, "II": -0.2}
    logits = rng.normal(size=(4, len(shipped.taxonomy)))
    np.testing.assert_allclose(loaded.probabilities(logits), saved.probabilities(logits))


def test_probabilities_are_softmax_of_logits_over_temperature_plus_the_class_bias() -> None:
    logits = np.array([[2.0, 0.0], [0.0, 0.0], [-1.0, 3.0]])
    plain = Calibration().probabilities(logits, 2.0, CLASSES)
    np.testing.assert_allclose(plain, np.exp(logits / 2) / np.exp(logits / 2).sum(axis=1, keepdims=True))
    biased = Calibration(class_bias={"B": 1.5}).probabilities(logits, 2.0, CLASSES)  # "A" has none: 0
    shifted = logits / 2 + np.array([0.0, 1.5])
    np.testing.assert_allclose(biased, np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(biased.sum(axis=1), 1.0)
    assert biased[1, 1] == pytest.approx(1 / (1 + np.exp(-1.5)))  # a tie moved to B by its bias
    huge = Calibration().probabilities(np.array([[1e4, -1e4]]), 1.0, CLASSES)  # no overflow
    assert np.isfinite(huge).all() and huge[0, 0] == pytest.approx(1.0)


def test_a_card_with_a_broken_out_of_distribution_model_is_refused() -> None:
    with pytest.raises(CheckpointError, match="inconsistent shapes"):
        OutOfDistribution.from_dict({"mean": [0, 0], "scale": [1, 1], "weights": [1, 2, 3], "bias": 0,
                                     "threshold": 0.5})
    with pytest.raises(CheckpointError, match="invalid out-of-distribution"):
        Calibration.from_dict({"ood": {"mean": [0.0]}})


def test_export_keeps_the_temperature_and_the_calibration(tmp_path) -> None:
    from spectranet.training.export import export_trained

    shipped = load_checkpoint()
    cal = Calibration(thresholds={"Ia": 0.93, "II": 0.8}, target_purity={"Ia": 0.99, "II": 0.9})
    save_checkpoint(shipped.build_model(), tmp_path / "run" / "m-9.9.9", name="m", version="9.9.9",
                    taxonomy=shipped.taxonomy, preprocess=shipped.preprocess, temperature=1.7, calibration=cal)
    exported = export_trained(tmp_path / "run" / "m-9.9.9", tmp_path / "models")
    loaded = load_checkpoint(tmp_path / "models" / "m-9.9.9")
    assert loaded.temperature == exported.temperature == 1.7
    assert loaded.calibration.thresholds == {"Ia": 0.93, "II": 0.8}
