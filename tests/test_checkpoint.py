"""Tests of spectranet.streamer.science.checkpoint: round trip, hash and version refusals, missing files, choosing the
newest model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from spectranet.streamer.errors import CheckpointError
from spectranet.streamer.science.checkpoint import default_checkpoint_path, load_checkpoint, save_checkpoint
from spectranet.streamer.science.model import ModelConfig, SpectraNet
from spectranet.streamer.science.preprocess import SUPPORTED_PREPROCESS_VERSIONS, Grid, PreprocessConfig
from spectranet.streamer.science.taxonomy import CLASSES

TINY = ModelConfig(n_bins=64, widths=(8, 16), kernels=((7, 5, 3), (5, 3, 1)), hidden=16)
PREPROCESS = PreprocessConfig(grid=Grid(3500.0, 10000.0, 64), normalisation="continuum")


def _model(seed: int = 0, config: ModelConfig = TINY) -> SpectraNet:
    torch.manual_seed(seed)
    return SpectraNet(config).eval()


def _save(path: Path, *, version: str = "0.1.0", seed: int = 0, **kwargs) -> Path:
    save_checkpoint(_model(seed), path, name="spectranet-test", version=version, taxonomy=CLASSES,
                    preprocess=PREPROCESS, **kwargs)
    return path


def _edit_card(weights: Path, **changes) -> Path:
    card = weights.parent / weights.name.replace(".safetensors", ".json")
    d = json.loads(card.read_text())
    d.update(changes)
    card.write_text(json.dumps(d))
    return card


@pytest.fixture
def saved(tmp_path) -> Path:
    return _save(tmp_path / "spectranet-test-0.1.0.safetensors", temperature=1.5,
                 extra={"metrics": {"val_accuracy": 0.5}, "training": {"n_spectra": 10}})


def test_round_trip_gives_identical_outputs(saved):
    original = _model(0)
    loaded = load_checkpoint(saved).build_model().eval()
    x = torch.randn(3, 2, TINY.n_bins, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = original(x), loaded(x)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.z_mean, b.z_mean)
    assert torch.equal(a.z_logvar, b.z_logvar)


def test_round_trip_keeps_the_card(saved):
    ck = load_checkpoint(saved)
    assert (ck.name, ck.version) == ("spectranet-test", "0.1.0")
    assert ck.model_config == TINY
    assert ck.taxonomy == CLASSES
    assert ck.preprocess == PREPROCESS
    assert ck.preprocess_version in SUPPORTED_PREPROCESS_VERSIONS
    assert ck.temperature == 1.5
    assert ck.extra == {"metrics": {"val_accuracy": 0.5}, "training": {"n_spectra": 10}}
    assert ck.weights_sha256 == hashlib.sha256(saved.read_bytes()).hexdigest()
    card = json.loads(saved.with_name("spectranet-test-0.1.0.json").read_text())
    assert card["weights_sha256"] == ck.weights_sha256
    assert card["taxonomy"] == list(CLASSES)
    assert card["preprocess"]["grid"] == {"wave_min": 3500.0, "wave_max": 10000.0, "n_bins": 64}


@pytest.mark.parametrize("as_given", ["spectranet-test-0.1.0", "spectranet-test-0.1.0.json",
                                      "spectranet-test-0.1.0.safetensors"])
def test_load_by_stem_card_or_weights_despite_dots_in_the_version(saved, as_given):
    assert load_checkpoint(saved.parent / as_given).version == "0.1.0"


def test_tampered_weights_are_refused(saved):
    data = bytearray(saved.read_bytes())
    data[-5] ^= 0x01  # one bit of one weight
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(saved)


def test_weights_replaced_by_another_valid_checkpoint_are_refused(saved, tmp_path):
    other = _save(tmp_path / "other" / "x-0.1.0.safetensors", seed=1)
    saved.write_bytes(other.read_bytes())
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(saved)


@pytest.mark.parametrize("version", ["0.9", "2.0", "", None])
def test_unsupported_preprocess_version_is_refused(saved, version):
    assert version not in SUPPORTED_PREPROCESS_VERSIONS
    _edit_card(saved, preprocess_version=version)
    with pytest.raises(CheckpointError, match="preprocessing version"):
        load_checkpoint(saved)


@pytest.mark.parametrize("format_version", [0, 2, "1", None])
def test_other_card_format_versions_are_refused(saved, format_version):
    _edit_card(saved, format_version=format_version)
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(saved)


@pytest.mark.parametrize("missing", [".safetensors", ".json"])
def test_missing_files_are_refused(saved, missing):
    saved.with_name(f"spectranet-test-0.1.0{missing}").unlink()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(saved)


def test_nonexistent_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing-1.0.0")


def test_corrupt_or_incomplete_cards_are_refused(saved):
    card = saved.with_name("spectranet-test-0.1.0.json")
    good = json.loads(card.read_text())
    card.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(saved)
    card.write_text(json.dumps({k: v for k, v in good.items() if k != "model_config"}))
    with pytest.raises(CheckpointError, match="model_config"):
        load_checkpoint(saved)
    card.write_text(json.dumps({**good, "version": "latest"}))
    with pytest.raises(CheckpointError, match="semantic version"):
        load_checkpoint(saved)


def test_card_whose_config_does_not_fit_the_weights_is_refused(saved):
    _edit_card(saved, model_config={**TINY.to_dict(), "widths": [8, 24]})
    ck = load_checkpoint(saved)  # the card itself is well formed; the mismatch shows when building
    with pytest.raises(CheckpointError, match="does not fit"):
        ck.build_model()


def test_taxonomy_must_match_the_model(tmp_path):
    with pytest.raises(CheckpointError, match="taxonomy"):
        save_checkpoint(_model(), tmp_path / "x-0.1.0", name="x", version="0.1.0", taxonomy=CLASSES[:-1],
                        preprocess=PREPROCESS)


def test_default_checkpoint_path_picks_the_highest_semantic_version(tmp_path):
    for version in ("0.9.0", "0.10.0", "0.10.0-rc1", "0.2.0", "0.9.12"):
        _save(tmp_path / f"spectranet-{version}.safetensors", version=version)
    chosen = default_checkpoint_path(tmp_path)
    assert chosen == tmp_path / "spectranet-0.10.0.safetensors"
    assert load_checkpoint(chosen).version == "0.10.0"


def test_default_checkpoint_path_reads_versions_from_cards_not_file_names(tmp_path):
    _save(tmp_path / "b.safetensors", version="1.2.0")
    _save(tmp_path / "a.safetensors", version="1.10.0")
    assert default_checkpoint_path(tmp_path) == tmp_path / "a.safetensors"


def test_default_checkpoint_path_in_an_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no model checkpoint"):
        default_checkpoint_path(tmp_path)


def test_the_shipped_model_loads_and_verifies():
    path = default_checkpoint_path()
    ck = load_checkpoint()
    assert ck.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ck.taxonomy == CLASSES
    assert ck.model_config.n_bins == ck.preprocess.grid.n_bins
    assert ck.build_model().config == ck.model_config
