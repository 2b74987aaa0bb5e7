"""SEDM simulation: shapes, finiteness, seeded reproducibility, and the SEDM wavelength range."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from spectranet.streamer.science.preprocess import PreprocessConfig
from spectranet.streamer.science.taxonomy import CLASSES
from spectranet.training.data import Spectrum
from spectranet.training.loop import TrainConfig
from spectranet.training.simulate import (
    SEDM_DEFAULT,
    apply_lsf,
    draw_redshift,
    mix_spectra,
    redshift_pool,
    sedm_pixels,
    simulate_input,
    simulate_sedm,
)
from spectranet.training.train import SimulatedSEDM, mix_classes, training_simulation


def _template(label: str = "Ia", redshift: float = 0.0) -> Spectrum:
    wave = np.arange(2500.0, 9800.0, 2.0)
    flux = 1.0 + 0.3 * np.sin(wave / 300.0) - 0.5 * np.exp(-0.5 * ((wave - 6150.0) / 60.0) ** 2)
    return Spectrum(wave=wave, flux=flux, label=label, object_id="sn-test", source="test", redshift=redshift,
                    phase=0.0, path="test.txt")


def _galaxy() -> tuple[np.ndarray, np.ndarray]:
    wave = np.arange(1500.0, 12000.0, 5.0)
    return wave, 1.0 + 2.0 * np.exp(-0.5 * ((wave - 6563.0) / 5.0) ** 2)


def test_redshifts_drawn_from_the_pool_of_real_ones():
    """Templates (z 0) are not in the pool; a pooled draw lands near a real redshift of the class, far above z_max."""
    pool = redshift_pool([_template("Ia", 0.0), _template("Ia", 0.62), _template("II", 0.03)])
    assert pool == (("II", (0.03,)), ("Ia", (0.62,)))
    rng = np.random.default_rng(0)
    pooled = replace(SEDM_DEFAULT, z_pool=pool, z_pool_prob=1.0)
    zs = np.array([draw_redshift(_template("Ia"), rng, pooled) for _ in range(200)])
    assert np.all(np.abs(np.log1p(zs) - np.log1p(0.62)) < 5 * SEDM_DEFAULT.z_pool_jitter)
    assert zs.std() > 0.01  # jittered, not the one value
    # a class without pooled redshifts, and the default (no pool), stay uniform up to z_max
    for spec, cfg in ((_template("Ib"), pooled), (_template("Ia"), SEDM_DEFAULT)):
        zs = np.array([draw_redshift(spec, rng, cfg) for _ in range(200)])
        assert zs.min() >= cfg.z_min and zs.max() <= cfg.z_upper(spec.label)


def test_training_simulation_takes_the_configs_redshift_settings():
    """``keep_source_z`` and ``z_pool_prob`` reach the simulation that draws training samples; the defaults keep
    SimConfig's own, and an observed spectrum keeps its redshift as often as ``keep_source_z`` says."""
    observed = [_template("Ia", 0.4), _template("II", 0.02)]
    assert training_simulation(TrainConfig(), observed) == SEDM_DEFAULT
    sim = training_simulation(TrainConfig(keep_source_z=0.8, z_pool_prob=0.5), observed)
    assert sim.keep_source_z == 0.8 and sim.z_pool_prob == 0.5 and dict(sim.z_pool) == {"II": (0.02,), "Ia": (0.4,)}
    rng = np.random.default_rng(1)
    for keep in (0.0, 0.8, 1.0):
        cfg = training_simulation(TrainConfig(keep_source_z=keep), observed)
        kept = np.mean([draw_redshift(observed[0], rng, cfg) == 0.4 for _ in range(2000)])
        assert abs(kept - keep) < 0.03


def test_simulated_spectrum_is_on_sedm_pixels():
    for seed in range(20):
        sim = simulate_sedm(_template(), [_galaxy()], np.random.default_rng(seed))
        assert sim is not None
        step = np.diff(sim.wave)
        assert np.allclose(step, step[0]) and abs(step[0] - 25.6) <= 25.6 * 0.021
        assert sim.wave[0] >= 3777.0 - 40.0 - 1e-9 and sim.wave[-1] <= 3777.0 + 40.0 + 213 * 25.6 * 1.021
        assert SEDM_DEFAULT.min_pixels <= sim.wave.size <= 214
        assert np.all(np.isfinite(sim.flux)) and np.all(sim.flux_err > 0)
        assert SEDM_DEFAULT.z_min <= sim.z <= SEDM_DEFAULT.z_upper("Ia")


def test_simulate_input_shapes_finite_and_seeded():
    pre = PreprocessConfig(normalisation="continuum")
    x1, z1 = simulate_input(_template(), [_galaxy()], np.random.default_rng([1, 2, 3]), pre)
    x2, z2 = simulate_input(_template(), [_galaxy()], np.random.default_rng([1, 2, 3]), pre)
    x3, _ = simulate_input(_template(), [_galaxy()], np.random.default_rng([1, 2, 4]), pre)
    assert x1.shape == (2, pre.grid.n_bins) and x1.dtype == np.float32
    assert np.all(np.isfinite(x1))
    assert np.array_equal(x1, x2) and z1 == z2
    assert not np.array_equal(x1, x3)
    covered = np.flatnonzero(x1[1] > 0)
    centers = pre.grid.centers()
    # never covers more than SEDM reaches: ~3737-9290 A (start jitter +-40 A, step jitter 2%)
    assert centers[covered[0]] > 3700.0 and centers[covered[-1]] < 9400.0
    assert np.all(x1[0][x1[1] == 0] == 0)


def test_slsn_reaches_higher_redshift_and_lsf_broadens():
    sims = [simulate_sedm(_template("SLSN-I"), [], np.random.default_rng(s)) for s in range(60)]
    zs = [sim.z for sim in sims if sim is not None]
    assert len(zs) == len(sims)
    assert max(zs) > 0.3
    wave = np.arange(4000.0, 8000.0, 1.0)
    line = np.exp(-0.5 * ((wave - 6000.0) / 8.0) ** 2)  # FWHM 18.8 A, resolved by the LSF's ~8.5 A sampling
    fine, broad = apply_lsf(wave, line, 100.0)
    half = fine[broad >= broad.max() / 2]
    expected = np.hypot(6000.0 / 100.0, 8.0 * 2.3548)  # FWHMs add in quadrature; LSF FWHM = 6000 A / R
    assert half[-1] - half[0] == pytest.approx(expected, abs=9.0)  # one sampling step


def test_sedm_pixels_truncation_is_bounded():
    rng = np.random.default_rng(0)
    sizes = [sedm_pixels(rng, SEDM_DEFAULT).size for _ in range(200)]
    assert min(sizes) >= 214 - 2 * SEDM_DEFAULT.truncate_max and max(sizes) == 214


def test_mix_spectra_blends_two_spectra_of_a_class_in_the_rest_frame():
    a = _template("Ib", 0.05)
    b = replace(_template("Ib"), wave=np.arange(3000.0, 11000.0, 3.0), object_id="sn-other")
    b = replace(b, flux=1.0 + 0.5 * np.cos(b.wave / 150.0))
    b = replace(b, flux=b.flux / np.median(b.flux))
    mixed = mix_spectra(a, b, 0.25)
    inside = a.wave >= 3000.0
    assert np.array_equal(mixed.wave, a.wave[inside])  # a's wavelengths where b covers them
    expected = 0.25 * a.flux[inside] + 0.75 * np.interp(mixed.wave, b.wave, b.flux)
    assert np.allclose(mixed.flux, expected / np.median(expected)) and np.median(mixed.flux) == pytest.approx(1.0)
    assert (mixed.label, mixed.object_id, mixed.redshift) == (a.label, a.object_id, a.redshift)
    assert np.allclose(mix_spectra(a, b, 1.0).flux, a.flux[inside] / np.median(a.flux[inside]))
    # too little overlap: a unchanged
    far = replace(b, wave=np.arange(9000.0, 12000.0, 3.0), flux=np.ones(1000))
    assert mix_spectra(a, far, 0.5) is a


def test_small_classes_are_mixed_with_another_object_of_their_class():
    """A flat Ib spectrum's draws show the strong line of the other Ib objects only when mixing is on; Ia (200
    objects, not a small class) is drawn unmixed."""
    pre = PreprocessConfig()
    wave = np.arange(2500.0, 9800.0, 2.0)
    flat = replace(_template("Ib"), object_id="sn-flat", flux=np.ones_like(wave))
    bump = 1.0 + 5.0 * np.exp(-0.5 * ((wave - 6000.0) / 40.0) ** 2)
    line = [replace(_template("Ib"), object_id=f"sn-line{k}", flux=bump) for k in range(2)]
    ia = [replace(_template("Ia"), object_id=f"sn-ia{k}") for k in range(200)]
    spectra = [flat, *line, *ia]
    assert mix_classes(TrainConfig(mix_prob=0.5, mix_max_objects=150), spectra) == ("Ib",)
    assert mix_classes(TrainConfig(mix_prob=0.0), spectra) == ()
    plain = SimulatedSEDM(spectra, [], pre, seed=3)
    mixed = SimulatedSEDM(spectra, [], pre, seed=3, mix_prob=1.0, mix_classes=("Ib",))

    def peak(ds: SimulatedSEDM, i: int) -> float:
        return float(np.median([np.abs(ds[(epoch, i)][0][0].numpy()).max() for epoch in range(12)]))

    assert peak(mixed, 0) > 1.6 * peak(plain, 0)   # the flat spectrum's draws carry the line of another Ib object
    assert mixed[(0, 0)][1] == plain[(0, 0)][1] == CLASSES.index("Ib")
    for epoch in range(3):
        assert np.allclose(plain[(epoch, 10)][0], mixed[(epoch, 10)][0])  # Ia: drawn exactly as before
