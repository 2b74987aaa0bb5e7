"""A SNID-style template matcher: the baseline SpectraNet has to beat, run on exactly the same inputs.

Like SNID (Blondin & Tonry 2007): spectra on a log-wavelength grid, so a redshift is a shift; continuum removed and
edges apodised (``science.preprocess.remove_continuum``); every template is cross-correlated with the input over all
redshifts 0..z_max at once with FFTs; the score of a (template, z) pair is the overlap-normalised correlation
coefficient times the overlap fraction (SNID's r x lap, with r the plain correlation coefficient rather than SNID's
peak-height ratio). The best-scoring template gives the type and the redshift.

Templates are the *training* spectra, brought to the same resolution as the inputs (R ~ 100) and put on a rest-frame
grid that extends the model grid blueward by ln(1 + z_max), so template bin ``j + shift`` lines up with input bin
``j`` at redshift exp(shift * dln) - 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft
from spectranet.streamer.errors import PreprocessError
from spectranet.streamer.science.preprocess import Grid, PreprocessConfig, prepare
from spectranet.streamer.science.taxonomy import CLASSES
from spectranet.training.data import Spectrum
from spectranet.training.simulate import apply_lsf

__all__ = ["TemplateBank", "build_bank", "match"]


@dataclass(frozen=True, eq=False)
class TemplateBank:
    flux: np.ndarray      # float32 [T, n_rest] continuum-removed, 0 outside coverage
    mask: np.ndarray      # float32 [T, n_rest]
    labels: np.ndarray    # int [T] class index
    n_shift: int          # shifts 0..n_shift-1 (z from 0 to z_max)
    dln: float            # log-wavelength step of the grids


def _rest_grid(grid: Grid, z_max: float) -> tuple[Grid, int, float]:
    dln = math.log(grid.wave_max / grid.wave_min) / grid.n_bins
    n_shift = int(math.ceil(math.log1p(z_max) / dln)) + 1
    rest = Grid(grid.wave_min * math.exp(-(n_shift - 1) * dln), grid.wave_max, grid.n_bins + n_shift - 1)
    return rest, n_shift, dln


def build_bank(templates: Sequence[Spectrum], preprocess: PreprocessConfig, *, z_max: float = 0.6,
               resolution: float = 100.0) -> TemplateBank:
    """Rest-frame, R ~ ``resolution``, continuum-removed templates on the model grid extended by ln(1 + z_max)."""
    rest, n_shift, dln = _rest_grid(preprocess.grid, z_max)
    cfg = PreprocessConfig(grid=rest, normalisation="continuum", min_coverage=0.05,
                           continuum_knots=preprocess.continuum_knots)
    fluxes, masks, labels = [], [], []
    for s in templates:
        w, f = apply_lsf(s.wave, s.flux, resolution)
        try:
            p = prepare(w, f, medium="vacuum", config=cfg)  # same medium both ways: no shift
        except PreprocessError:
            continue
        fluxes.append(p.flux)
        masks.append(p.coverage.astype(np.float32))
        labels.append(CLASSES.index(s.label))
    return TemplateBank(np.stack(fluxes).astype(np.float32), np.stack(masks), np.array(labels), n_shift, dln)


def match(bank: TemplateBank, flux: np.ndarray, coverage: np.ndarray, *, min_lap: float = 0.4,
          chunk: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best template per input: (class index [N], z [N], score [N]).

    ``flux``: [N, n_bins] continuum-removed inputs (the model's input channel 0 with continuum normalisation);
    ``coverage``: [N, n_bins]. For every template and shift k, over the bins both cover:
    r = sum(s t) / sqrt(sum(s^2) sum(t^2)), lap = overlap / input coverage; score = r * lap, with lap >= ``min_lap``.
    """
    # circular correlation is exact when n_fft covers the template grid plus one (input bins + lags never wrap)
    n_fft = 1 << int(math.ceil(math.log2(bank.flux.shape[1] + 1)))
    T, T2, Mt = (sfft.rfft(a, n_fft) for a in (bank.flux, bank.flux**2, bank.mask))  # complex64 [T, F]
    k = np.arange(bank.n_shift)
    offs = bank.n_shift - 1 - k  # template bin j + offs[k] sits under input bin j at shift k
    out_cls = np.zeros(len(flux), int)
    out_z = np.zeros(len(flux))
    out_score = np.full(len(flux), -np.inf)
    for start in range(0, len(flux), chunk):
        s = np.asarray(flux[start:start + chunk], np.float32) * coverage[start:start + chunk]
        m = np.asarray(coverage[start:start + chunk], np.float32)
        # correlation c[o] = sum_j a[j] b[j + o]  ->  irfft(conj(A) B)[o]
        S, S2, Ms = (np.conj(sfft.rfft(a, n_fft))[:, None, :] for a in (s, s**2, m))  # [n, 1, F]
        num = sfft.irfft(S * T[None], n_fft)[..., offs]          # [n, T, K]
        ss = sfft.irfft(S2 * Mt[None], n_fft)[..., offs]         # sum s^2 over the overlap
        tt = sfft.irfft(Ms * T2[None], n_fft)[..., offs]         # sum t^2 over the overlap
        lap = sfft.irfft(Ms * Mt[None], n_fft)[..., offs] / np.maximum(m.sum(axis=1), 1)[:, None, None]
        r = num / np.sqrt(np.clip(ss, 1e-12, None) * np.clip(tt, 1e-12, None))
        score = np.where(lap >= min_lap, r * np.clip(lap, 0, 1), -np.inf)
        flat = score.reshape(len(s), -1).argmax(axis=1)             # [n]
        t_idx, k_idx = np.unravel_index(flat, score.shape[1:])
        out_cls[start:start + len(s)] = bank.labels[t_idx]
        out_z[start:start + len(s)] = np.expm1(k_idx * bank.dln)
        out_score[start:start + len(s)] = score.reshape(len(s), -1)[np.arange(len(s)), flat]
    return out_cls, out_z, out_score
