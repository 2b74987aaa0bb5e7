"""Tests of ``spectranet classify``: the real command on one file of every format, errors, order and batching."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from spectranet.streamer.contract.readers import FORMATS, prepare_file, read_spectrum, sniff_format
from spectranet.streamer.science.calibration import Calibration, OutOfDistribution
from spectranet.streamer.science.checkpoint import default_checkpoint_path, load_checkpoint, save_checkpoint
from spectranet.streamer.science.inference import InferenceEngine
from spectranet.streamer.science.model import ModelConfig, SpectraNet
from spectranet.streamer.science.preprocess import PreprocessConfig
from spectranet.streamer.science.taxonomy import CLASSES, hierarchical_call
from spectranet.streamer.science.templates import DEFAULT_WINDOW
from spectranet.streamer.tools.files import classify_files

ROOT = Path(__file__).resolve().parents[1]
FORMAT_FIXTURES = sorted(f"tests/data/formats/{p.name}" for p in (ROOT / "tests/data/formats").iterdir()
                         if p.suffix in (".fits", ".txt", ".csv"))
SHARED_ASCII = "tests/data/spectra/SN2012P__00.txt"
SEDM = "tests/data/spectra/2019dwa_TNS_ZTF_SEDM_2019.0514.txt"
BAD = sorted(f"tests/data/bad_spectra/{p.name}" for p in (ROOT / "tests/data/bad_spectra").glob("*.txt"))
MISSING = "tests/data/spectra/no_such_spectrum.txt"
RESULT_KEYS = {"file", "top_class", "probabilities", "redshift", "redshift_err", "model", "quality",
               "confident", "redshift_network", "redshift_method", "template",  # these four since schema 1.1
               "called_class"}  # since 1.2


def _classify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spectranet.streamer.cli", "classify", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def _json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]  # every line must be one JSON object


def _check_result(r: dict, model: dict) -> None:
    assert set(r) == RESULT_KEYS
    assert list(r["probabilities"]) == list(CLASSES)
    assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert r["top_class"] == max(r["probabilities"], key=r["probabilities"].get)
    p = np.array([[r["probabilities"][c] for c in CLASSES]])
    assert r["called_class"] == CLASSES[int(hierarchical_call(p, CLASSES)[0])]
    assert r["redshift"] >= 0.0 and r["redshift_err"] > 0.0
    assert r["model"] == model
    q = r["quality"]
    assert 0.0 < q["coverage_fraction"] <= 1.0
    assert 0.0 <= q["ood_score"] <= 1.0
    assert "median_snr" in q
    assert r["redshift_network"] >= 0.0
    if r["redshift_method"] == "template":
        assert set(r["template"]) == {"object", "type", "phase", "r"} and r["template"]["r"] > 0
        assert abs(math.log1p(r["redshift"]) - math.log1p(r["redshift_network"])) <= DEFAULT_WINDOW + 1e-9  # the window
    else:
        assert r["redshift_method"] == "model" and r["template"] is None
        assert r["redshift"] == r["redshift_network"]


@pytest.fixture(scope="module")
def garbage(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("classify") / "garbage.txt"
    path.write_text("this is not\na spectrum at all\n")
    return str(path)


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory) -> Path:
    """A tiny model on the default preprocessing grid (the command reads the grid from the checkpoint)."""
    preprocess = PreprocessConfig()
    config = ModelConfig(n_bins=preprocess.grid.n_bins, widths=(8, 16), kernels=((9, 5, 3), (5, 3, 1)), hidden=16)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny-2.3.4.safetensors"
    save_checkpoint(SpectraNet(config), path, name="tiny", version="2.3.4", taxonomy=CLASSES, preprocess=preprocess)
    return path


@pytest.fixture(scope="module")
def shipped_run(garbage):
    """One run of the real command with the shipped model, good and bad files interleaved."""
    files = [FORMAT_FIXTURES[0], MISSING, *FORMAT_FIXTURES[1:], SHARED_ASCII, BAD[0], SEDM, garbage, *BAD[1:2]]
    return files, _classify("--json", *files)


def test_fixtures_cover_every_format():
    assert {sniff_format(ROOT / p) for p in [*FORMAT_FIXTURES, SHARED_ASCII, SEDM]} == set(FORMATS)


def test_one_json_object_per_file_in_order(shipped_run):
    files, proc = shipped_run
    assert proc.returncode == 0, proc.stderr
    results = _json_lines(proc.stdout)
    assert [r["file"] for r in results] == files  # the path as given, in input order


def test_readable_files_get_full_results_with_the_model_identity(shipped_run):
    files, proc = shipped_run
    weights = default_checkpoint_path()
    card = load_checkpoint(weights)
    model = {"name": card.name, "version": card.version, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    results = {r["file"]: r for r in _json_lines(proc.stdout)}
    for path in [*FORMAT_FIXTURES, SHARED_ASCII, SEDM]:
        assert "error" not in results[path], results[path]
        _check_result(results[path], model)
        # the shipped model's calibration decides: no thresholds in its card -> null, else a decision
        assert (results[path]["confident"] is None) == (not card.calibration.thresholds)
    # the shipped template bank is on by default: the SEDM spectrum of a SN Ic matches a stripped-envelope template
    assert results[SEDM]["redshift_method"] == "template"
    assert results[SEDM]["template"]["type"].startswith(("Ib", "Ic"))


def test_templates_none_keeps_the_networks_redshift():
    proc = _classify("--json", "--templates", "none", SEDM)
    assert proc.returncode == 0, proc.stderr
    (r,) = _json_lines(proc.stdout)
    assert (r["redshift_method"], r["template"]) == ("model", None)
    assert r["redshift"] == r["redshift_network"]


def test_a_template_bank_that_cannot_be_read_is_one_line_naming_the_option(tmp_path):
    bad = tmp_path / "bank.npz"
    bad.write_bytes(b"not a bank")
    proc = _classify("--templates", str(bad), SEDM)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "--templates" in proc.stderr and "Traceback" not in proc.stderr


def test_text_output_says_the_call_its_confidence_and_the_template(shipped_run):
    proc = _classify(SEDM)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    (r,) = [r for r in _json_lines(shipped_run[1].stdout) if r["file"] == SEDM]
    t = r["template"]
    assert line.startswith(f"{SEDM}: {r['top_class']} {r['probabilities'][r['top_class']]:.2f}")
    assert f"z={r['redshift']:.3f}" in line
    assert f"[template: looks like {t['object']} ({t['type']}) at {round(t['phase']):+d} d]" in line
    called = f"[called {r['called_class']} {r['probabilities'][r['called_class']]:.2f} down the tree"
    assert (called in line) == (r["called_class"] != r["top_class"])


CALIBRATED_FILES = [*FORMAT_FIXTURES, SHARED_ASCII, SEDM]


@pytest.fixture(scope="module")
def calibrated_path(checkpoint_path, tmp_path_factory) -> Path:
    """The tiny model with a hand-made calibration: every class confident at p >= 0; out of distribution, the
    spectra whose mean input flux is above the median of ``CALIBRATED_FILES``'."""
    tiny = load_checkpoint(checkpoint_path)
    n = tiny.model_config.n_bins
    means = [prepare_file(read_spectrum(ROOT / f), tiny.preprocess).model_input()[0].mean() for f in CALIBRATED_FILES]
    ood = OutOfDistribution(mean=np.zeros(n), scale=np.ones(n), weights=np.full(n, 1.0 / n),
                            bias=-float(np.median(means)), threshold=0.5)
    path = tmp_path_factory.mktemp("model") / "tiny-2.3.5.safetensors"
    save_checkpoint(tiny.build_model(), path, name="tiny", version="2.3.5", taxonomy=CLASSES,
                    preprocess=tiny.preprocess, calibration=Calibration(thresholds={c: 0.0 for c in CLASSES}, ood=ood))
    return path


def test_confident_and_out_of_distribution_come_from_the_models_calibration(calibrated_path):
    engine = InferenceEngine(load_checkpoint(calibrated_path), device="cpu", warmup=False)
    ood = engine.checkpoint.calibration.ood
    assert ood is not None
    files = [str(ROOT / p) for p in CALIBRATED_FILES]
    results = list(classify_files(files, engine))
    prepared = [prepare_file(read_spectrum(f), engine.checkpoint.preprocess) for f in files]
    expected = ood.flag(np.stack([p.model_input()[0] for p in prepared]))
    assert expected.any() and not expected.all()
    assert [("out_of_distribution" in r["quality"]["flags"]) for r in results] == expected.tolist()
    assert all(r["confident"] is True for r in results)
    proc = _classify("--model", str(calibrated_path), *files)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert all("(confident)" in line for line in lines)
    assert ["out of distribution" in line for line in lines] == expected.tolist()


def test_unreadable_and_bad_files_yield_error_objects(shipped_run, garbage):
    _, proc = shipped_run
    results = {r["file"]: r for r in _json_lines(proc.stdout)}
    for path in (MISSING, garbage, BAD[0], BAD[1]):
        assert set(results[path]) == {"file", "error"}
        assert isinstance(results[path]["error"], str) and results[path]["error"]
    assert MISSING in results[MISSING]["error"]  # the message names the file


def test_every_bad_spectrum_is_an_error_not_a_prediction(checkpoint_path):
    # in-process with a tiny model on the default grid: the bad spectra fail in reading or preprocessing
    engine = InferenceEngine(load_checkpoint(checkpoint_path), device="cpu", warmup=False)
    results = list(classify_files([str(ROOT / p) for p in BAD], engine))
    assert [set(r) for r in results] == [{"file", "error"}] * len(BAD)


def test_all_files_failing_exits_non_zero(garbage):
    proc = _classify("--json", MISSING, garbage)
    assert proc.returncode == 1
    assert [set(r) for r in _json_lines(proc.stdout)] == [{"file", "error"}] * 2


# ------------------------------------------------------------------------------------------------ --model, batching


def test_model_option_uses_that_checkpoint(checkpoint_path):
    proc = _classify("--json", "--model", str(checkpoint_path), SEDM, FORMAT_FIXTURES[0])
    assert proc.returncode == 0, proc.stderr
    model = {"name": "tiny", "version": "2.3.4", "sha256": hashlib.sha256(checkpoint_path.read_bytes()).hexdigest()}
    results = _json_lines(proc.stdout)
    assert [r["file"] for r in results] == [SEDM, FORMAT_FIXTURES[0]]
    for r in results:
        _check_result(r, model)


def test_internal_batches_keep_order_and_results(checkpoint_path, garbage):
    engine = InferenceEngine(load_checkpoint(checkpoint_path), device="cpu", warmup=False)
    files = [str(ROOT / p) for p in [*FORMAT_FIXTURES, SHARED_ASCII]]
    files.insert(2, garbage)
    one_batch = list(classify_files(files, engine, batch_size=256))
    small_batches = list(classify_files(files, engine, batch_size=2))
    assert [r["file"] for r in small_batches] == files
    assert [set(r) == {"file", "error"} for r in small_batches] == [p == garbage for p in files]
    for a, b in zip(one_batch, small_batches):
        assert a.keys() == b.keys()
        if "probabilities" in a:
            assert a["probabilities"] == pytest.approx(b["probabilities"], rel=1e-5, abs=1e-6)
            assert a["redshift"] == pytest.approx(b["redshift"], rel=1e-5, abs=1e-6)


def test_a_rest_frame_file_is_classified_in_the_rest_frame_of_its_header_redshift(tmp_path: Path) -> None:
    source = Path(__file__).parent / "data" / "spectra" / "SN2014ey__00.txt"
    text = source.read_text().replace("# frame: observed", "# frame: rest").replace("# redshift: 0.03197",
                                                                                    "# redshift: 0.25")
    rest = tmp_path / "rest_frame.txt"
    rest.write_text(text)
    sf = read_spectrum(rest)
    assert (sf.frame, sf.redshift) == ("rest", 0.25)
    engine = InferenceEngine(load_checkpoint(), device="cpu", warmup=False)
    prepared = prepare_file(sf, engine.checkpoint.preprocess)
    (result,) = classify_files([str(rest)], engine)
    at_header_z = engine.predict([prepared], z_prior=[0.25])[0].probabilities
    own_z = engine.predict([prepared])[0].probabilities
    assert result["probabilities"] == pytest.approx(at_header_z, abs=1e-9)
    assert abs(math.log1p(result["redshift_network"]) - math.log1p(0.25)) >= 0.02  # 0.12 with 0.4.0: frames differ
    assert result["probabilities"] != pytest.approx(own_z, abs=1e-4)
