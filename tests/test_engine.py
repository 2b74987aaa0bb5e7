"""Tests of spectranet.streamer.science.inference: well-formed predictions, batching, device selection,
out-of-memory halving, GPU parity, and the checkpoint's calibration (confident, out of distribution)."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from spectranet.streamer.contract.readers import prepare_file, read_spectrum
from spectranet.streamer.errors import CheckpointError, ConfigError
from spectranet.streamer.science.calibration import Calibration, OutOfDistribution
from spectranet.streamer.science.checkpoint import Checkpoint, load_checkpoint
from spectranet.streamer.science.inference import InferenceEngine, resolve_precision, select_device
from spectranet.streamer.science.model import ModelConfig, ModelOutput, SpectraNet
from spectranet.streamer.science.preprocess import Grid, Prepared, PreprocessConfig, prepare
from spectranet.streamer.science.taxonomy import CLASSES

SPECTRA = Path(__file__).parent / "data" / "spectra"
TINY = ModelConfig(n_bins=128, widths=(8, 16, 16), kernels=((9, 5, 3), (5, 3, 1), (3, 3, 1)), hidden=16)
PREPROCESS = PreprocessConfig(grid=Grid(3500.0, 10000.0, TINY.n_bins))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _checkpoint(temperature: float = 1.0) -> Checkpoint:
    torch.manual_seed(0)
    model = SpectraNet(TINY)
    assert model.classifier is not None  # one network: it classifies
    with torch.no_grad():  # a random net gives near-uniform probabilities; spread the logits so argmax means something
        model.classifier.weight.mul_(20.0)
    return Checkpoint(name="tiny", version="0.0.0", model_config=TINY, taxonomy=CLASSES, preprocess=PREPROCESS,
                      weights_sha256="0" * 64, temperature=temperature,
                      state_dict={k: v.clone() for k, v in model.state_dict().items()})


@pytest.fixture(scope="module")
def checkpoint() -> Checkpoint:
    return _checkpoint(temperature=1.7)


@pytest.fixture
def engine(checkpoint) -> InferenceEngine:
    return InferenceEngine(checkpoint, device="cpu", max_forward_batch=256)


@pytest.fixture(scope="module")
def prepared() -> list[Prepared]:
    out = []
    for name in ("SN2012P__00.txt", "SN2013gr__07.txt", "2019dwa_TNS_ZTF_SEDM_2019.0514.txt", "PTF10qts__05.txt",
                 "LSQ13dos__00.txt", "SN2011hw__00.txt"):
        sf = read_spectrum(SPECTRA / name)
        out.append(prepare(sf.wavelength, sf.flux, flux_err=sf.flux_err, wavelength_unit=sf.wavelength_unit,
                           flux_unit=sf.flux_unit, config=PREPROCESS))
    return out


def _arrays(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 2, TINY.n_bins)).astype(np.float32)


def _as_table(preds) -> np.ndarray:
    return np.array([[*p.probabilities.values(), p.z, p.z_err, p.ood_score] for p in preds])


def _spy_on_forward(monkeypatch, model, sizes: list[int], fail_above: int | None = None) -> None:
    """Record the batch size of every forward call; optionally raise CUDA OOM for batches above ``fail_above``."""
    forward = model.forward

    def spy(x):
        if fail_above is not None and x.shape[0] > fail_above:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated for a batch of {x.shape[0]})")
        sizes.append(x.shape[0])
        return forward(x)

    monkeypatch.setattr(model, "forward", spy)


# ------------------------------------------------------------------------------------------------ predictions


def test_predictions_are_well_formed(engine, prepared):
    preds = engine.predict(prepared)
    assert len(preds) == len(prepared)
    for p in preds:
        assert list(p.probabilities) == list(CLASSES)  # taxonomy order
        probs = np.array(list(p.probabilities.values()))
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert (probs >= 0).all() and (probs <= 1).all()
        assert p.top_class == CLASSES[int(probs.argmax())]
        assert p.top_probability == pytest.approx(probs.max())
        assert p.z >= 0.0
        assert p.z_err > 0.0 and math.isfinite(p.z_err)
        assert 0.0 <= p.ood_score <= 1.0
    assert len({p.top_class for p in preds} | {round(p.z, 6) for p in preds}) > 2  # not one constant answer


def test_predictions_follow_the_model_and_its_temperature(engine, checkpoint):
    x = _arrays(5)
    preds = engine.predict_arrays(x)
    model = checkpoint.build_model().eval()
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    probs = torch.softmax(out.logits / 1.7, dim=1).numpy()
    entropy = -(probs * np.log(probs)).sum(axis=1) / math.log(len(CLASSES))
    np.testing.assert_allclose([list(p.probabilities.values()) for p in preds], probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose([p.z for p in preds], np.maximum(out.z_mean.numpy(), 0.0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose([p.z_err for p in preds], np.exp(0.5 * out.z_logvar.numpy()), rtol=1e-5)
    np.testing.assert_allclose([p.ood_score for p in preds], entropy, rtol=1e-5, atol=1e-6)


def test_ood_score_spans_certain_to_uniform_and_z_is_never_negative(engine, monkeypatch):
    def fake(x):
        logits = torch.zeros(x.shape[0], len(CLASSES))
        logits[0, 2] = 1000.0  # spectrum 0: certain; spectrum 1: uniform
        return ModelOutput(logits=logits, z_mean=torch.tensor([-0.3, 0.2]), z_logvar=torch.tensor([0.0, -4.0]),
                           features=torch.zeros(x.shape[0], 8))

    monkeypatch.setattr(engine.model, "forward", fake)
    certain, uniform = engine.predict_arrays(_arrays(2))
    assert certain.top_class == CLASSES[2] and certain.ood_score == pytest.approx(0.0, abs=1e-6)
    assert uniform.ood_score == pytest.approx(1.0, abs=1e-6)
    assert uniform.top_probability == pytest.approx(1 / len(CLASSES))
    assert certain.z == 0.0 and uniform.z == pytest.approx(0.2)
    assert certain.z_err == pytest.approx(1.0) and uniform.z_err == pytest.approx(math.exp(-2.0))


def test_empty_batch(engine):
    assert engine.predict([]) == []


def test_engine_runs_in_eval_mode_and_is_deterministic(engine, prepared):
    assert not engine.model.training
    a, b = engine.predict(prepared), engine.predict(prepared)
    assert _as_table(a).tolist() == _as_table(b).tolist()


def test_warm_up_runs_one_small_batch_at_start(checkpoint, monkeypatch):
    sizes: list[int] = []
    forward = SpectraNet.forward

    def spy(self, x):
        sizes.append(x.shape[0])
        return forward(self, x)

    monkeypatch.setattr(SpectraNet, "forward", spy)
    InferenceEngine(checkpoint, device="cpu", warmup=True)
    assert sizes == [4]
    InferenceEngine(checkpoint, device="cpu", warmup=False)
    assert sizes == [4]


# ------------------------------------------------------------------------------------------------ batching


def test_large_batches_are_split_and_agree_with_one_by_one(checkpoint, monkeypatch):
    engine = InferenceEngine(checkpoint, device="cpu", max_forward_batch=3, warmup=False)
    x = _arrays(8, seed=1)
    sizes: list[int] = []
    _spy_on_forward(monkeypatch, engine.model, sizes)
    together = engine.predict_arrays(x)
    assert sizes == [3, 3, 2]
    one_by_one = [engine.predict_arrays(x[i:i + 1])[0] for i in range(len(x))]
    np.testing.assert_allclose(_as_table(together), _as_table(one_by_one), rtol=1e-5, atol=1e-6)
    assert [p.top_class for p in together] == [p.top_class for p in one_by_one]


def test_out_of_memory_halves_the_batch_and_loses_nothing(checkpoint, monkeypatch, caplog):
    x = _arrays(10, seed=2)
    reference = InferenceEngine(checkpoint, device="cpu", warmup=False).predict_arrays(x)
    engine = InferenceEngine(checkpoint, device="cpu", max_forward_batch=8, warmup=False)
    sizes: list[int] = []
    _spy_on_forward(monkeypatch, engine.model, sizes, fail_above=2)
    with caplog.at_level(logging.WARNING, logger="spectranet.streamer.science.inference"):
        preds = engine.predict_arrays(x)
    assert engine.max_forward_batch == 2  # 8 -> 4 -> 2, and it stays there for later calls
    assert sizes == [2, 2, 2, 2, 2]
    assert sum("out of memory" in r.getMessage() for r in caplog.records) == 2
    np.testing.assert_allclose(_as_table(preds), _as_table(reference), rtol=1e-5, atol=1e-6)


def test_out_of_memory_at_batch_size_one_is_raised(checkpoint, monkeypatch):
    engine = InferenceEngine(checkpoint, device="cpu", max_forward_batch=4, warmup=False)
    _spy_on_forward(monkeypatch, engine.model, [], fail_above=0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        engine.predict_arrays(_arrays(3))
    assert engine.max_forward_batch == 1


# ------------------------------------------------------------------------------------------------ devices


def test_auto_device_and_explicit_cpu():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_a_config_error(checkpoint, device):
    with pytest.raises(ConfigError, match="CUDA is not available"):
        InferenceEngine(checkpoint, device=device)


@needs_cuda
def test_cuda_agrees_with_cpu_and_uses_pinned_buffers(checkpoint, prepared, monkeypatch):
    cpu = InferenceEngine(checkpoint, device="cpu")
    gpu = InferenceEngine(checkpoint, device="cuda")
    assert gpu.device.type == "cuda"
    assert next(gpu.model.parameters()).is_cuda
    pinned: list[bool] = []
    pin_memory = torch.Tensor.pin_memory

    def spy(self, *args, **kwargs):
        out = pin_memory(self, *args, **kwargs)
        pinned.append(out.is_pinned())
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", spy)
    on_gpu = gpu.predict(prepared)
    on_cpu = cpu.predict(prepared)
    assert pinned and all(pinned)
    a, b = _as_table(on_gpu), _as_table(on_cpu)
    n = len(CLASSES)
    np.testing.assert_allclose(a[:, :n], b[:, :n], atol=0.03)  # bf16 autocast on the GPU
    np.testing.assert_allclose(a[:, n:n + 2], b[:, n:n + 2], rtol=0.05, atol=0.02)
    np.testing.assert_allclose(a[:, n + 2], b[:, n + 2], atol=0.03)
    assert sum(x.top_class == y.top_class for x, y in zip(on_gpu, on_cpu)) >= len(prepared) - 1


# ------------------------------------------------------------------------------------- calibration: confident, OOD


def _calibrated(checkpoint: Checkpoint, *, thresholds: dict[str, float], ood: bool) -> Checkpoint:
    """``checkpoint`` with a hand-made calibration; its OOD score is sigmoid(mean input flux), flagged above 0.8
    (mean flux above ~1.39): inputs shifted up are "not transients", centred ones are."""
    n = checkpoint.model_config.n_bins
    model = OutOfDistribution(mean=np.zeros(n), scale=np.ones(n), weights=np.full(n, 1.0 / n), bias=0.0,
                              threshold=0.8) if ood else None
    return dataclasses.replace(checkpoint, calibration=Calibration(thresholds=thresholds, ood=model))


def test_confident_follows_the_checkpoints_thresholds_and_ood_its_flux_score(checkpoint):
    x = _arrays(24, seed=3)
    x[12:, 0] += 3.0  # the second half's flux channel is far from anything the OOD model was "fitted" on
    plain = InferenceEngine(checkpoint, device="cpu", warmup=False).predict_arrays(x)
    threshold = float(np.median([p.top_probability for p in plain]))
    top = {p.top_class for p in plain}
    # every class that came out on top has the median as its threshold, except one, which has none
    without = sorted(top)[0]
    thresholds = {c: threshold for c in CLASSES if c != without}
    engine = InferenceEngine(_calibrated(checkpoint, thresholds=thresholds, ood=True), device="cpu", warmup=False)
    preds = engine.predict_arrays(x)
    for p, q in zip(preds, plain):
        assert p.probabilities == q.probabilities  # calibration decides, it does not change the probabilities
        assert p.confident is (p.top_class != without and p.top_probability >= threshold)
    assert {p.confident for p in preds} == {True, False}
    assert [p.out_of_distribution for p in preds] == [False] * 12 + [True] * 12


def test_the_class_bias_moves_the_engines_probabilities_and_calls(checkpoint):
    x = _arrays(12, seed=4)
    plain = InferenceEngine(checkpoint, device="cpu", warmup=False).predict_arrays(x)
    target = CLASSES[-1]
    biased_ckpt = dataclasses.replace(checkpoint, calibration=Calibration(class_bias={target: 50.0}))
    biased = InferenceEngine(biased_ckpt, device="cpu", warmup=False).predict_arrays(x)
    assert {p.top_class for p in biased} == {target} != {p.top_class for p in plain}
    logits = np.log(np.array([[q.probabilities[c] for c in CLASSES] for q in plain]))  # up to a constant per row
    expected = Calibration(class_bias={target: 50.0}).probabilities(logits, 1.0, CLASSES)
    got = np.array([[q.probabilities[c] for c in CLASSES] for q in biased])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-9)
    assert [p.z for p in biased] == [p.z for p in plain]  # the redshift is not the calibration's business


def test_a_checkpoint_without_calibration_is_never_confident_nor_out_of_distribution(checkpoint):
    x = _arrays(6)
    x[3:, 0] += 3.0
    for thresholds in ({}, {c: 0.0 for c in CLASSES}):
        preds = InferenceEngine(_calibrated(checkpoint, thresholds=thresholds, ood=False), device="cpu",
                                warmup=False).predict_arrays(x)
        assert all(p.out_of_distribution is False for p in preds)
        assert {p.confident for p in preds} == ({None} if not thresholds else {True})
    only_ood = InferenceEngine(_calibrated(checkpoint, thresholds={}, ood=True), device="cpu", warmup=False)
    preds = only_ood.predict_arrays(x)
    assert [p.confident for p in preds] == [None] * 6  # no thresholds: null, not False
    assert [p.out_of_distribution for p in preds] == [False] * 3 + [True] * 3


def test_calibration_is_per_spectrum_whatever_the_chunking(checkpoint):
    x = _arrays(40, seed=5)
    x[::3, 0] += 3.0
    cal = _calibrated(checkpoint, thresholds={c: 0.5 for c in CLASSES}, ood=True)
    whole = InferenceEngine(cal, device="cpu", warmup=False, cpu_forward_batch=64).predict_arrays(x)
    chunked = InferenceEngine(cal, device="cpu", warmup=False, cpu_forward_batch=7).predict_arrays(x)
    assert [(p.confident, p.out_of_distribution) for p in whole] == \
        [(p.confident, p.out_of_distribution) for p in chunked]
    assert [p.out_of_distribution for p in whole] == [i % 3 == 0 for i in range(40)]


def test_an_ood_model_on_another_grid_is_refused(checkpoint):
    n = checkpoint.model_config.n_bins + 1
    bad = OutOfDistribution(mean=np.zeros(n), scale=np.ones(n), weights=np.zeros(n), bias=0.0, threshold=0.5)
    with pytest.raises(CheckpointError, match="out-of-distribution model has"):
        InferenceEngine(dataclasses.replace(checkpoint, calibration=Calibration(ood=bad)), device="cpu",
                        warmup=False)


def test_a_known_redshift_is_the_rest_frame_the_classifier_reads():
    shipped = load_checkpoint()  # two networks: the classifier reads a rest frame
    engine = InferenceEngine(shipped, device="cpu", warmup=False)
    prepared = [prepare_file(read_spectrum(SPECTRA / name), shipped.preprocess) for name in (
        "SN2012P__00.txt", "SN2013gr__07.txt", "2019dwa_TNS_ZTF_SEDM_2019.0514.txt", "PTF10qts__05.txt")]
    x = np.stack([p.model_input() for p in prepared])
    plain = engine.outputs(x)
    far = plain.z_network + 0.3                                  # well away from the network's own z
    prior = np.where(np.arange(len(x)) % 2 == 0, far, np.nan)    # every other spectrum has a known redshift
    given = engine.outputs(x, prior)
    with torch.inference_mode():
        at_prior = shipped.build_model().eval().classify_at(torch.from_numpy(x), torch.from_numpy(far).float())
    known = np.isfinite(prior)
    np.testing.assert_allclose(given.logits[known], at_prior.numpy()[known], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(given.logits[~known], plain.logits[~known])
    assert given.reclassified.tolist() == known.tolist()
    np.testing.assert_array_equal(given.z, plain.z)  # the reported redshifts stay the network's
    near = engine.outputs(x, plain.z_network + 0.001)            # a prior the network already agrees with
    np.testing.assert_array_equal(near.logits, plain.logits)
    preds = engine.predict(prepared, z_prior=prior.tolist())
    np.testing.assert_allclose([[p.probabilities[c] for c in shipped.taxonomy] for p in preds],
                               shipped.probabilities(given.logits), rtol=1e-6)
    with pytest.raises(ValueError, match="one redshift"):
        engine.outputs(x, prior[:-1])


# ------------------------------------------------------------------------------------------------ precision


def test_precision_is_float32_on_cpu_unless_bf16_is_asked_for():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) == torch.float32
    assert resolve_precision("auto", cuda) == resolve_precision("bfloat16", cpu) == torch.bfloat16
    assert resolve_precision("float32", cuda) == torch.float32
    with pytest.raises(ConfigError, match="precision must be one of"):
        resolve_precision("fp16", cpu)


def test_bf16_on_cpu_computes_in_bf16_and_stays_close_to_float32(checkpoint, monkeypatch):
    x = _arrays(32, seed=9)
    exact = InferenceEngine(checkpoint, device="cpu", warmup=False)
    half = InferenceEngine(checkpoint, device="cpu", warmup=False, precision="bfloat16")
    seen: list[torch.dtype] = []
    half.model.register_forward_hook(lambda _m, _i, out: seen.append(out.logits.dtype))
    a, b = exact.outputs(x), half.outputs(x)
    assert exact.dtype == torch.float32 and half.dtype == torch.bfloat16 and set(seen) == {torch.bfloat16}
    assert b.logits.dtype == np.float32 and not np.array_equal(a.logits, b.logits)  # rounded, as bf16 rounds
    np.testing.assert_allclose(b.logits, a.logits, atol=0.05 * np.abs(a.logits).max())
    assert (a.logits.argmax(1) == b.logits.argmax(1)).mean() >= 0.9
