"""Classify spectrum files directly (``spectranet classify``): read, prepare, batch through the engine."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

from streamer.engine import InferenceEngine
from streamer.errors import PacketError, SpectrumFileError
from streamer.preprocess import Prepared, prepare
from streamer.readers import SpectrumFile, read_spectrum

__all__ = ["prepare_file", "classify_files"]


def prepare_file(sf: SpectrumFile, engine: InferenceEngine) -> Prepared:
    wavelength = sf.wavelength
    if sf.frame == "rest":  # the model reads observer-frame spectra
        wavelength = wavelength * (1.0 + (sf.redshift or 0.0))
    return prepare(wavelength, sf.flux, flux_err=sf.flux_err, wavelength_unit=sf.wavelength_unit,
                   flux_unit=sf.flux_unit, flux_calibrated=sf.flux_calibrated,
                   config=engine.checkpoint.preprocess)


def _result(path: str, prepared: Prepared, pred: Any, engine: InferenceEngine) -> dict[str, Any]:
    ck = engine.checkpoint
    return {
        "file": path,
        "top_class": pred.top_class,
        "probabilities": pred.probabilities,
        "redshift": pred.z,
        "redshift_err": pred.z_err,
        "model": {"name": ck.name, "version": ck.version, "sha256": ck.weights_sha256},
        "quality": {"coverage_fraction": prepared.coverage_fraction,
                    "median_snr": None if math.isnan(prepared.median_snr) else prepared.median_snr,
                    "ood_score": pred.ood_score, "flags": list(prepared.flags)},
    }


def classify_files(paths: Iterable[str], engine: InferenceEngine, *, batch_size: int = 256) -> Iterator[dict[str, Any]]:
    """One result per path, in order; unreadable files yield ``{"file", "error"}`` and never stop the others."""
    pending: list[tuple[str, Prepared]] = []

    def flush() -> Iterator[dict[str, Any]]:
        preds = engine.predict([p for _, p in pending])
        for (path, prepared), pred in zip(pending, preds):
            yield _result(path, prepared, pred, engine)
        pending.clear()

    for path in paths:
        try:
            pending.append((path, prepare_file(read_spectrum(path), engine)))
        except (SpectrumFileError, PacketError) as exc:
            yield from flush()  # keep output in input order
            yield {"file": path, "error": f"{type(exc).__name__}: {exc}"}
            continue
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()
