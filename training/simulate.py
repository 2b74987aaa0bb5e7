"""SEDM simulation: turn a rest-frame spectrum from any instrument or template library into what SEDM would record.

SEDM (the Spectral Energy Distribution Machine on the Palomar 60-inch) is an IFU with R ~ 100 and ~25.6 A pixels
from ~3777 A (214 pixels, to ~9250 A). Almost none of our labelled spectra come from it, so every training sample is
simulated on the fly, in this order (each step is a small pure function of its inputs and a numpy ``Generator``):

    draw z -> host galaxy light -> redshift -> reddening + calibration tilt -> R~100 Gaussian LSF
           -> SEDM pixels (start/step jitter, edge truncation) -> telluric residuals -> noise at SNR 5-100

and the result goes through ``spectranet.streamer.science.preprocess.prepare`` with the checkpoint's
``PreprocessConfig``: the tensor the model trains on is made by exactly the code that makes it at inference. Same
seed, same sample.

Simplifications, stated: reddening is a power law A_lambda = A_V (lambda / 5500 A)^-1.3 rather than CCM; telluric
residuals are multiplicative Gaussian-edged boxes at the O2 B and A bands and the 9300 A water band; the LSF is
constant in R across the range; noise is Gaussian with a variance that follows the flux and rises at the blue end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np
from scipy.ndimage import gaussian_filter1d
from spectranet.streamer.errors import PreprocessError
from spectranet.streamer.science.preprocess import Grid, PreprocessConfig, prepare
from spectranet.training.data import Spectrum

__all__ = ["SimConfig", "Simulated", "SEDM_DEFAULT", "sedm_input_bins", "draw_redshift", "redshift_pool", "mix_spectra",
           "sedm_pixels", "apply_lsf", "simulate_sedm", "first_usable", "simulate_input", "to_model_input"]

T = TypeVar("T")

_SIGMA_PER_FWHM = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
_TELLURIC_BANDS = ((6865.0, 6885.0), (7590.0, 7690.0), (8950.0, 9700.0))  # O2 B, O2 A, H2O (observed, A)


@dataclass(frozen=True)
class SimConfig:
    """Ranges the simulator draws from; ``z_max`` per class because SLSNe and TDEs are found farther away."""

    resolution: tuple[float, float] = (80.0, 130.0)       # R = lambda / FWHM
    pixel_start: float = 3777.0                           # A, first SEDM pixel centre
    pixel_step: float = 25.6                              # A
    n_pixels: int = 214
    start_jitter: float = 40.0                            # A, uniform +-
    step_jitter: float = 0.02                             # fractional, uniform +-
    truncate_prob: float = 0.4                            # chance of cutting each edge
    truncate_max: int = 40                                # pixels
    snr: tuple[float, float] = (5.0, 100.0)               # log-uniform per-pixel median S/N
    z_min: float = 0.005
    z_max: tuple[tuple[str, float], ...] = (("SLSN-I", 0.6), ("TDE", 0.35))
    z_max_default: float = 0.15
    keep_source_z: float = 0.3                            # chance an observed spectrum keeps its own redshift
    # Chance a re-drawn redshift comes from ``z_pool``, the redshifts of the class's real observed spectra (jittered
    # by ``z_pool_jitter`` in ln(1 + z)), instead of uniform to z_max: real Ia reach z ~ 1 and a network that saw
    # only z <= 0.15 places them low (0.5.0: 121 of 218 real-degraded validation spectra above z 0.2 were outliers).
    z_pool_prob: float = 0.0
    z_pool: tuple[tuple[str, tuple[float, ...]], ...] = ()
    z_pool_jitter: float = 0.05
    host_prob: float = 0.6
    host_fraction: tuple[float, float] = (0.0, 0.7)       # host / SN median flux
    ebv_max: float = 0.3                                  # mag, uniform
    tilt_sigma: float = 0.4                               # power-law index of the calibration tilt
    curve_sigma: float = 0.1                              # quadratic (in log lambda) calibration curvature
    telluric_depth: tuple[float, float] = (-0.05, 0.3)
    min_pixels: int = 40                                  # a simulated spectrum keeps at least this many pixels

    def z_upper(self, label: str) -> float:
        return dict(self.z_max).get(label, self.z_max_default)


SEDM_DEFAULT = SimConfig()


@dataclass(frozen=True, eq=False)
class Simulated:
    wave: np.ndarray      # float64 [n_px], observed frame, A
    flux: np.ndarray      # float64 [n_px]
    flux_err: np.ndarray  # float64 [n_px]
    z: float


def draw_redshift(spec: Spectrum, rng: np.random.Generator, cfg: SimConfig) -> float:
    """Uniform in [z_min, z_max(class)], or (``z_pool_prob``) a real redshift of the class, jittered; observed
    spectra sometimes keep their own z (no re-shifting artefacts)."""
    if spec.redshift > 0 and rng.random() < cfg.keep_source_z:
        return float(spec.redshift)
    if cfg.z_pool_prob > 0:
        pool = dict(cfg.z_pool).get(spec.label, ())
        if pool and rng.random() < cfg.z_pool_prob:
            z = pool[int(rng.integers(len(pool)))]
            return max(cfg.z_min, float((1.0 + z) * math.exp(rng.normal(0.0, cfg.z_pool_jitter)) - 1.0))
    return float(rng.uniform(cfg.z_min, cfg.z_upper(spec.label)))


def redshift_pool(spectra: Sequence[Spectrum]) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """``SimConfig.z_pool``: per class, the redshifts of its observed spectra (templates, at z 0, are not counted)."""
    pool: dict[str, list[float]] = {}
    for s in spectra:
        if s.redshift > 0:
            pool.setdefault(s.label, []).append(round(float(s.redshift), 5))
    return tuple((label, tuple(sorted(zs))) for label, zs in sorted(pool.items()))


def mix_spectra(a: Spectrum, b: Spectrum, weight: float, *, min_overlap: float = 0.5) -> Spectrum:
    """``weight`` * a + (1 - weight) * b in the rest frame, on a's wavelengths where b covers them (both are median 1),
    keeping a's label, object, redshift and phase: a new spectrum of the class for the small classes' training
    samples (same-class mixing). Returns ``a`` unchanged where the two share less than ``min_overlap`` of a's range."""
    inside = (a.wave >= b.wave[0]) & (a.wave <= b.wave[-1])
    if inside.sum() < 2 or (a.wave[inside][-1] - a.wave[inside][0]) < min_overlap * (a.wave[-1] - a.wave[0]):
        return a
    wave = a.wave[inside]
    flux = weight * a.flux[inside] + (1.0 - weight) * np.interp(wave, b.wave, b.flux)
    return replace(a, wave=wave, flux=flux / np.median(flux), path=f"{a.path} + {b.path}")


def sedm_input_bins(grid: Grid, cfg: SimConfig = SEDM_DEFAULT) -> tuple[int, int]:
    """(first, stop): the grid bins that lie wholly between the bluest and the reddest pixel centre ``sedm_pixels``
    can draw (start and step jitter at their extremes): every bin a simulated spectrum can cover, and so every bin
    a network trained on them has seen (``ModelConfig.input_bins``). 3737-9379 A on the default grid: bins 16-239."""
    lo = cfg.pixel_start - cfg.start_jitter
    hi = cfg.pixel_start + cfg.start_jitter + cfg.pixel_step * (1.0 + cfg.step_jitter) * (cfg.n_pixels - 1)
    edges = grid.edges()
    inside = np.flatnonzero((edges[:-1] >= lo) & (edges[1:] <= hi))
    if not inside.size:
        raise ValueError(f"no bin of the {grid.wave_min}-{grid.wave_max} A grid lies within {lo:.0f}-{hi:.0f} A")
    return int(inside[0]), int(inside[-1]) + 1


def sedm_pixels(rng: np.random.Generator, cfg: SimConfig) -> np.ndarray:
    """Pixel centres [n] with start and step jitter and random edge truncation."""
    start = cfg.pixel_start + rng.uniform(-cfg.start_jitter, cfg.start_jitter)
    step = cfg.pixel_step * (1.0 + rng.uniform(-cfg.step_jitter, cfg.step_jitter))
    wave = start + step * np.arange(cfg.n_pixels)
    lo = int(rng.integers(0, cfg.truncate_max + 1)) if rng.random() < cfg.truncate_prob else 0
    hi = int(rng.integers(0, cfg.truncate_max + 1)) if rng.random() < cfg.truncate_prob else 0
    return wave[lo: cfg.n_pixels - hi]


def apply_lsf(wave: np.ndarray, flux: np.ndarray, resolution: float) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian LSF of constant R: resample to a uniform log grid (3 pixels per sigma) and convolve there."""
    sigma_ln = _SIGMA_PER_FWHM / resolution
    dln = sigma_ln / 3.0
    ln = np.arange(math.log(wave[0]), math.log(wave[-1]), dln)
    fine = np.exp(ln)
    return fine, gaussian_filter1d(np.interp(fine, wave, flux), 3.0, mode="nearest")


def _extinction(wave: np.ndarray, ebv: float) -> np.ndarray:
    return 10.0 ** (-0.4 * 3.1 * ebv * (wave / 5500.0) ** -1.3)


def _telluric(wave: np.ndarray, rng: np.random.Generator, cfg: SimConfig) -> np.ndarray:
    factor = np.ones_like(wave)
    for lo, hi in _TELLURIC_BANDS:
        depth = rng.uniform(*cfg.telluric_depth)
        edge = 0.25 * (hi - lo)
        profile = 0.5 * (np.tanh((wave - lo) / edge * 2) - np.tanh((wave - hi) / edge * 2))
        factor *= 1.0 - depth * profile
    return factor


def simulate_sedm(spec: Spectrum, galaxies: Sequence[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator,
                  cfg: SimConfig = SEDM_DEFAULT, *, z: float | None = None) -> Simulated | None:
    """One SEDM-like observation of ``spec`` at ``z`` (drawn when None); None when too few pixels remain."""
    z = draw_redshift(spec, rng, cfg) if z is None else z
    rest, flux = spec.wave, spec.flux.copy()

    # host galaxy light, in the rest frame, as a fraction of the SN's median flux
    if galaxies and rng.random() < cfg.host_prob:
        g_wave, g_flux = galaxies[int(rng.integers(len(galaxies)))]
        flux = flux + rng.uniform(*cfg.host_fraction) * np.interp(rest, g_wave, g_flux)

    # observed frame: Milky Way + host reddening and flux-calibration tilt/curvature
    obs = rest * (1.0 + z)
    x = np.log(obs / 6500.0)
    flux = flux * _extinction(obs, rng.uniform(0.0, cfg.ebv_max))
    flux = flux * np.exp(rng.normal(0.0, cfg.tilt_sigma) * x + rng.normal(0.0, cfg.curve_sigma) * x**2 / 0.1)

    # R ~ 100, then SEDM pixels where the input covers them
    fine_wave, fine_flux = apply_lsf(obs, flux, rng.uniform(*cfg.resolution))
    px = sedm_pixels(rng, cfg)
    px = px[(px >= fine_wave[0]) & (px <= fine_wave[-1])]
    if px.size < cfg.min_pixels:
        return None
    pflux = np.interp(px, fine_wave, fine_flux) * _telluric(px, rng, cfg)

    # noise: median S/N log-uniform, variance following the flux and rising to the blue end
    snr = math.exp(rng.uniform(math.log(cfg.snr[0]), math.log(cfg.snr[1])))
    level = float(np.median(np.abs(pflux)))
    if not level > 0:
        return None
    shape = np.sqrt(np.clip(pflux / level, 0.2, 5.0)) * (1.0 + 1.5 * np.exp(-(px - cfg.pixel_start) / 300.0))
    err = level / snr * shape / np.median(shape)
    noisy = pflux + rng.normal(0.0, 1.0, px.size) * err
    return Simulated(wave=px, flux=noisy, flux_err=err, z=z)


def to_model_input(wave: np.ndarray, flux: np.ndarray, flux_err: np.ndarray | None,
                   preprocess: PreprocessConfig) -> np.ndarray:
    """[2, n_bins] float32 (normalised flux, coverage) exactly as the inference engine stacks it."""
    p = prepare(wave, flux, flux_err=flux_err, medium="air", config=preprocess)
    return p.model_input()


def first_usable(spec: Spectrum, galaxies: Sequence[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator,
                 use: Callable[[Simulated], T], *, tries: int = 8, cfg: SimConfig = SEDM_DEFAULT) -> T:
    """``use`` of the first of up to ``tries`` simulated observations that it can use (the one home of the draw
    retry): a draw with too few pixels, or one that ``use`` rejects with ``PreprocessError``, is drawn again.
    Raises ``PreprocessError`` when none of the ``tries`` draws is usable."""
    for _ in range(tries):
        sim = simulate_sedm(spec, galaxies, rng, cfg)
        if sim is None:
            continue
        try:
            return use(sim)
        except PreprocessError:
            continue
    raise PreprocessError(f"{spec.path} epoch {spec.epoch}: none of {tries} simulated draws is usable", field="flux")


def simulate_input(spec: Spectrum, galaxies: Sequence[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator,
                   preprocess: PreprocessConfig, cfg: SimConfig = SEDM_DEFAULT,
                   tries: int = 8) -> tuple[np.ndarray, float]:
    """(x [2, n_bins] float32, z): a simulated SEDM spectrum through ``prepare``; retries draws that fail.

    After ``tries`` failed draws (a short template at a high z, say) the spectrum is simulated at its own redshift
    without truncation, which always reaches the grid because ``spectranet.training.data`` dropped spectra that do not.
    """
    def as_input(sim: Simulated) -> tuple[np.ndarray, float]:
        return to_model_input(sim.wave, sim.flux, sim.flux_err, preprocess), sim.z

    try:
        return first_usable(spec, galaxies, rng, as_input, tries=tries, cfg=cfg)
    except PreprocessError:
        pass  # none of the draws reached the grid: the spectrum's own redshift, below
    z = max(spec.redshift, cfg.z_min)
    fallback = SimConfig(**{**cfg.__dict__, "truncate_prob": 0.0, "start_jitter": 0.0, "min_pixels": 10,
                            "host_prob": 0.0})
    sim = simulate_sedm(spec, galaxies, rng, fallback, z=z)
    if sim is None:
        raise PreprocessError(f"{spec.path} epoch {spec.epoch}: cannot be simulated on SEDM pixels", field="wavelength")
    return to_model_input(sim.wave, sim.flux, sim.flux_err, preprocess), sim.z  # may raise PreprocessError too
