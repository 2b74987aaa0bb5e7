"""End to end on a handful of synthetic spectra: train 2 steps -> checkpoint -> engine -> evaluate (JSON + PNGs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from streamer.checkpoint import load_checkpoint
from streamer.engine import InferenceEngine
from streamer.preprocess import prepare
from streamer.taxonomy import CLASSES
from training.data import load_galaxies, load_spectra, read_manifest
from training.evaluate import evaluate
from training.train import TrainConfig, train

_LINES = {"Ia": 6150.0, "II": 6563.0, "Ic": 7774.0, "SLSN-I": 4200.0}


def _write(path: Path, *, obj: str, label: str, z: float, frame: str, wave: np.ndarray, flux: np.ndarray,
           kind: str = "calibrated") -> None:
    rows = "\n".join(f"{w:.3f} {f:.6e}" for w, f in zip(wave, flux))
    path.write_text(f"# object: {obj}\n# type: {label}\n# redshift: {z}\n# frame: {frame}\n# flux_kind: {kind}\n"
                    f"# columns: wavelength flux\n{rows}\n")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two objects per class for four classes (two spectra each), one galaxy, one junk and one ambiguous file."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    lines = ["path,source,object,type,redshift,frame,flux_kind"]
    for label, centre in _LINES.items():
        for k in range(2):
            for epoch in range(2):
                obj = f"SN20{10 + k}{label.lower().replace('-', '')}"
                z = 0.03 + 0.02 * k
                rest = np.arange(3000.0, 9500.0, 4.0)
                flux = (rest / 5000.0) ** -1 * (1 - 0.5 * np.exp(-0.5 * ((rest - centre) / 80.0) ** 2))
                flux = flux * (1 + 0.01 * rng.normal(size=rest.size)) * 1e-15
                name = f"{obj}_{epoch}.txt"
                _write(root / name, obj=obj, label=label, z=z, frame="observed", wave=rest * (1 + z), flux=flux)
                lines.append(f"{name},osc,{obj},{label},{z},observed,calibrated")
    gw = np.arange(1500.0, 11000.0, 5.0)
    _write(root / "gal.txt", obj="galaxy-E", label="Galaxy/E", z=0.0, frame="rest", wave=gw, flux=np.ones_like(gw))
    lines.append("gal.txt,galaxies,galaxy-E,Galaxy/E,0.0,rest,calibrated")
    _write(root / "junk.txt", obj="hst", label="Ia", z=0.01, frame="observed", wave=np.linspace(1, 40, 50),
           flux=np.ones(50))
    lines.append("junk.txt,osc,hst,Ia,0.01,observed,calibrated")
    _write(root / "amb.txt", obj="amb", label="Ib/c", z=0.01, frame="observed", wave=np.linspace(3500, 9000, 500),
           flux=np.ones(500))
    lines.append("amb.txt,osc,amb,Ib/c,0.01,observed,calibrated")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


def test_loader_drops_junk_and_ambiguous(tiny_data: Path):
    entries = read_manifest(tiny_data / "manifest.csv")
    spectra, dropped = load_spectra(entries)
    assert len(spectra) == 16 and {s.label for s in spectra} == set(_LINES)
    assert dropped == {"ambiguous or outside taxonomy": 1, "no overlap with the grid": 1}
    assert len(load_galaxies(entries)) == 1
    s = spectra[0]
    assert s.wave[0] == pytest.approx(3000.0, rel=1e-6) and np.median(s.flux) == pytest.approx(1.0)  # rest frame


def test_two_step_training_checkpoint_engine_and_evaluate(tiny_data: Path, tmp_path: Path):
    cfg = TrainConfig(manifest=str(tiny_data / "manifest.csv"), out_dir=str(tmp_path / "run"), version="0.0.1-test",
                      batch_size=4, warmup_steps=1, max_steps=2, eval_every=1, val_fraction=0.5, val_repeats=1,
                      num_workers=0, resume=False, threads=1)
    ckpt = train(cfg)
    loaded = load_checkpoint(tmp_path / "run" / "spectranet-sedm-0.0.1-test")
    assert loaded.weights_sha256 == ckpt.weights_sha256
    assert loaded.taxonomy == CLASSES and loaded.temperature > 0
    assert loaded.extra["trained"] is True and loaded.extra["steps_run"] == 2
    assert loaded.preprocess.normalisation == "continuum"
    assert set(loaded.extra["data"]["train"]) == set(CLASSES)

    engine = InferenceEngine(loaded, device="cpu", warmup=False)
    wave = np.arange(3800.0, 9200.0, 25.6)
    p = prepare(wave, 1.0 + 0.1 * np.sin(wave / 200.0), config=loaded.preprocess)
    (pred,) = engine.predict([p])
    assert pred.top_class in CLASSES and sum(pred.probabilities.values()) == pytest.approx(1.0, abs=1e-5)

    out = tmp_path / "eval"
    report = evaluate(model=tmp_path / "run" / "spectranet-sedm-0.0.1-test", data_manifest=tiny_data / "manifest.csv",
                      out_dir=out, max_templates=20)
    data = json.loads((out / "metrics.json").read_text())
    assert data["summary"]["n"] == report["summary"]["n"] > 0
    assert {"SpectraNet", "baseline", "SpectraNet_beats_baseline", "ece"} <= set(data["summary"])
    for name in ("confusion.png", "confusion_baseline.png", "redshift.png", "pr.png", "reliability.png"):
        assert (out / name).stat().st_size > 1000

    # a user's own manifest of real files
    user = tmp_path / "mine.csv"
    user.write_text(f"path,type,redshift\n{tiny_data / 'SN2010ia_0.txt'},SN Ia,0.03\n"
                    f"{tiny_data / 'SN2011ii_1.txt'},II P,0.05\n{tiny_data / 'amb.txt'},Ib/c,0.01\n")
    report = evaluate(model=tmp_path / "run" / "spectranet-sedm-0.0.1-test", manifest=user,
                      data_manifest=tiny_data / "manifest.csv", out_dir=tmp_path / "eval2", max_templates=20)
    assert report["summary"]["n"] == 2
