"""Versioned model checkpoints: weights in safetensors plus a JSON card with everything needed to rebuild them.

``<stem>.safetensors`` holds the weights; ``<stem>.json`` holds the model name and semantic version, the
``ModelConfig``, the ordered taxonomy, the preprocessing parameters and version, training summary, metrics and the
SHA-256 of the weights file. Loading verifies the hash and refuses preprocessing versions this code cannot reproduce.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from spectranet.streamer.errors import CheckpointError, ConfigError
from spectranet.streamer.science.calibration import Calibration
from spectranet.streamer.science.model import ModelConfig, SpectraNet
from spectranet.streamer.science.preprocess import (
    PREPROCESS_VERSION,
    SUPPORTED_PREPROCESS_VERSIONS,
    PreprocessConfig,
)

__all__ = ["Checkpoint", "save_checkpoint", "save_derived", "load_checkpoint", "default_checkpoint_path", "sha256_file"]

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    name: str
    version: str
    model_config: ModelConfig
    taxonomy: tuple[str, ...]
    preprocess: PreprocessConfig
    weights_sha256: str
    preprocess_version: str = PREPROCESS_VERSION
    temperature: float = 1.0                 # softmax temperature from calibration on validation
    calibration: Calibration = field(default_factory=Calibration)  # purity thresholds, out-of-distribution model
    extra: dict[str, Any] = field(default_factory=dict)  # training summary, metrics, notes
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def build_model(self) -> SpectraNet:
        model = SpectraNet(self.model_config)
        try:
            missing, unexpected = model.load_state_dict(self.state_dict, strict=False)
        except RuntimeError as exc:  # strict=False still raises on a tensor whose shape does not fit
            raise CheckpointError(f"checkpoint {self.name} {self.version} does not fit its config: {exc}") from exc
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {self.name} {self.version} does not fit its config: "
                                  f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities [B, C] of the network's logits [B, C] (temperature and class bias)."""
        return self.calibration.probabilities(logits, self.temperature, self.taxonomy)

    def card(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "model_config": self.model_config.to_dict(),
            "taxonomy": list(self.taxonomy),
            "preprocess": self.preprocess.to_dict(),
            "preprocess_version": self.preprocess_version,
            "temperature": self.temperature,
            **({"calibration": self.calibration.to_dict()} if self.calibration != Calibration() else {}),
            "weights_sha256": self.weights_sha256,
            **({"extra": self.extra} if self.extra else {}),
        }


def _paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, card) for a checkpoint named with or without its suffix; versions contain dots, so no with_suffix."""
    path = Path(path)
    stem = path.name.removesuffix(".safetensors").removesuffix(".json")
    return path.parent / f"{stem}.safetensors", path.parent / f"{stem}.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(model: SpectraNet, path: str | Path, *, name: str, version: str, taxonomy: tuple[str, ...],
                    preprocess: PreprocessConfig, temperature: float = 1.0,
                    calibration: Calibration | None = None, extra: dict[str, Any] | None = None) -> Checkpoint:
    """Write ``path`` (.safetensors) and its JSON card; returns the checkpoint as it will load."""
    path, card_path = _paths(path)
    if len(taxonomy) != model.config.n_classes:
        raise CheckpointError(f"taxonomy has {len(taxonomy)} classes, model predicts {model.config.n_classes}")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"name": name, "version": version})
    ckpt = Checkpoint(name=name, version=version, model_config=model.config, taxonomy=tuple(taxonomy),
                      preprocess=preprocess, weights_sha256=sha256_file(path), temperature=temperature,
                      calibration=calibration or Calibration(), extra=dict(extra or {}), state_dict=state)
    card_path.write_text(json.dumps(ckpt.card(), indent=2) + "\n")
    return ckpt


def save_derived(source: Checkpoint, model: SpectraNet, out_dir: str | Path, *, version: str | None = None,
                 temperature: float | None = None, calibration: Calibration | None = None,
                 extra: dict[str, Any] | None = None) -> Checkpoint:
    """``model`` written as ``out_dir/<name>-<version>`` with ``source``'s name, taxonomy and preprocessing, and its
    version, temperature, calibration and card extras unless given: how a training step passes a checkpoint on."""
    version = source.version if version is None else version
    return save_checkpoint(model, Path(out_dir) / f"{source.name}-{version}", name=source.name, version=version,
                           taxonomy=source.taxonomy, preprocess=source.preprocess,
                           temperature=source.temperature if temperature is None else temperature,
                           calibration=source.calibration if calibration is None else calibration,
                           extra=source.extra if extra is None else extra)


def load_checkpoint(path: str | Path | None = None) -> Checkpoint:
    """Load and verify a checkpoint (the shipped default when ``path`` is None)."""
    weights, card_path = _paths(path if path is not None else default_checkpoint_path())
    for p in (weights, card_path):
        if not p.is_file():
            raise CheckpointError(f"checkpoint file {p} does not exist")
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{card_path} is not valid JSON: {exc}") from exc
    if card.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{card_path}: checkpoint format {card.get('format_version')} is not {FORMAT_VERSION}")
    if card.get("preprocess_version") not in SUPPORTED_PREPROCESS_VERSIONS:
        raise CheckpointError(
            f"{card_path}: preprocessing version {card.get('preprocess_version')} is not supported by this code "
            f"(supported: {sorted(SUPPORTED_PREPROCESS_VERSIONS)}); upgrade spectranet-stream or retrain")
    actual = sha256_file(weights)
    if actual != card.get("weights_sha256"):
        raise CheckpointError(f"{weights}: SHA-256 {actual} does not match the card's {card.get('weights_sha256')}; "
                              "the weights are corrupt or were replaced")
    try:
        model_config = ModelConfig.from_dict(card["model_config"])
        preprocess = PreprocessConfig.from_dict(card["preprocess"])
        _version_key(card["version"])
    except KeyError as exc:
        raise CheckpointError(f"{card_path}: card is missing key {exc.args[0]!r}") from exc
    except (TypeError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"{card_path}: invalid card: {exc}") from exc
    return Checkpoint(
        name=card["name"], version=card["version"], model_config=model_config,
        taxonomy=tuple(card["taxonomy"]), preprocess=preprocess,
        preprocess_version=card["preprocess_version"],
        weights_sha256=actual, temperature=float(card.get("temperature", 1.0)),
        calibration=Calibration.from_dict(card.get("calibration")),
        extra=card.get("extra", {}), state_dict=load_file(str(weights)),
    )


def default_checkpoint_path(folder: str | Path | None = None) -> Path:
    """The newest checkpoint in ``folder`` by semantic version (default: the models shipped in ``streamer/models/``).

    Versions compare numerically (0.10.0 is newer than 0.9.0) and a pre-release (1.0.0-rc1) is older than its release.
    """
    folder = Path(str(resources.files("spectranet.streamer") / "models")) if folder is None else Path(folder)
    versions = []
    for card_path in folder.glob("*.json"):
        try:
            version = json.loads(card_path.read_text())["version"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{card_path} is not a checkpoint card: {exc!r}") from exc
        versions.append((_version_key(version), card_path))
    if not versions:
        raise CheckpointError(f"no model checkpoint in {folder}; pass --model PATH")
    return _paths(max(versions)[1])[0]


def _version_key(version: str) -> tuple[tuple[int, ...], int, str]:
    """Sort key of a semantic version: (numbers, 1 for a release or 0 for a pre-release, pre-release tag)."""
    core, _, prerelease = str(version).split("+")[0].partition("-")
    try:
        numbers = tuple(int(x) for x in core.split("."))
    except ValueError:
        raise CheckpointError(f"checkpoint version {version!r} is not a semantic version (MAJOR.MINOR.PATCH)") from None
    return numbers, 0 if prerelease else 1, prerelease
