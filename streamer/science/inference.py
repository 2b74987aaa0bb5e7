"""Batched inference: one resident model, the same code path on CPU and GPU.

The model is loaded once, put in eval mode and warmed up; each call stacks prepared spectra into a pinned host
buffer, copies it to the device without blocking, and runs under ``inference_mode`` (bf16 autocast on CUDA). When
the GPU runs out of memory the batch is split and the maximum batch size halves for the rest of the run.

With a template bank (``templates=``) the network's redshift becomes a prior that template cross-correlation refines
on the CPU (``spectranet.streamer.science.templates``): ``Prediction.z`` is then the refined redshift where a template
matched well (``z_method == "template"``, ``template`` names it) and the network's otherwise; ``z_network`` always
keeps the network's own estimate.

The checkpoint's calibration (``Checkpoint.calibration``) adds the two decisions an astronomer acts on, computed here so
that the daemon and ``spectranet classify`` apply the same rule: ``confident`` (the top class's probability reaches its
class's purity threshold; None for a checkpoint without thresholds) and ``out_of_distribution`` (the input flux looks
like no class of the taxonomy; False for a checkpoint without an out-of-distribution model).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from spectranet.streamer.errors import CheckpointError, ConfigError
from spectranet.streamer.science.checkpoint import Checkpoint
from spectranet.streamer.science.preprocess import Prepared
from spectranet.streamer.science.templates import (
    DEFAULT_WINDOW,
    METHOD_NETWORK,
    METHOD_TEMPLATE,
    TemplateBank,
    TemplateMatch,
    default_template_bank_path,
    load_template_bank,
    refine_redshift,
)

__all__ = ["Prediction", "InferenceEngine", "select_device", "check_bank_fits", "TEMPLATES_DEFAULT",
           "TEMPLATES_OFF", "resolve_template_bank"]

TEMPLATES_DEFAULT = ""     # the template bank shipped in the package
TEMPLATES_OFF = "none"     # no template refinement

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    probabilities: dict[str, float]  # class -> probability, taxonomy order
    top_class: str
    top_probability: float
    z: float                         # final redshift: the template-refined one when z_method is "template"
    z_err: float                     # its 1-sigma uncertainty
    ood_score: float                 # normalised entropy of the probabilities, 0 (certain) .. 1 (uniform)
    z_network: float = math.nan      # the network's own redshift (nan: same as z)
    z_method: str = METHOD_NETWORK   # "template" or "network": which estimate z is
    template: TemplateMatch | None = None  # best-matching template when z_method is "template"
    confident: bool | None = None    # top probability >= its class's purity threshold; None: no thresholds
    out_of_distribution: bool = False  # the input looks like no class of the taxonomy (False: no such model)

    def __post_init__(self) -> None:
        if math.isnan(self.z_network):
            object.__setattr__(self, "z_network", self.z)
        if self.z_method not in (METHOD_NETWORK, METHOD_TEMPLATE):
            raise ValueError(f"z_method must be {METHOD_NETWORK!r} or {METHOD_TEMPLATE!r}, got {self.z_method!r}")


def resolve_template_bank(setting: str, checkpoint: Checkpoint) -> TemplateBank | None:
    """The bank a ``model.templates`` / ``--templates`` value names for ``checkpoint``: ``TEMPLATES_OFF`` ("none")
    no bank; a path, that bank file; ``TEMPLATES_DEFAULT`` ("") the bank shipped in the package. ``CheckpointError``
    when the file cannot be read; ``ConfigError`` when a bank given by path does not fit the checkpoint (another grid,
    or no continuum normalisation), while the shipped one is then left out with a warning: the default never stops a
    model from running."""
    value = setting.strip()
    if value.lower() == TEMPLATES_OFF:
        return None
    bank = load_template_bank(default_template_bank_path() if value == TEMPLATES_DEFAULT else value)
    try:
        check_bank_fits(bank, checkpoint)
    except ConfigError as exc:
        if value != TEMPLATES_DEFAULT:
            raise
        log.warning("model %s %s cannot use the shipped template bank (%s): redshifts are not refined",
                    checkpoint.name, checkpoint.version, exc)
        return None
    return bank


def check_bank_fits(bank: TemplateBank, checkpoint: Checkpoint) -> None:
    """ConfigError unless ``bank`` can refine ``checkpoint``'s redshifts (continuum normalisation, the same grid)."""
    if checkpoint.preprocess.normalisation != "continuum":
        raise ConfigError(f"template refinement needs continuum normalisation; checkpoint {checkpoint.name} "
                          f"{checkpoint.version} uses {checkpoint.preprocess.normalisation!r}")
    bank.check_grid(checkpoint.preprocess.grid)


def select_device(requested: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA without one is an error, not a silent CPU run."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r} requested but CUDA is not available (torch {torch.__version__})")
    return device


class InferenceEngine:
    def __init__(self, checkpoint: Checkpoint, *, device: str = "auto", max_forward_batch: int = 256,
                 cpu_forward_batch: int = 16, threads: int | None = None, warmup: bool = True,
                 templates: TemplateBank | None = None, template_top_k: int | None = 2,
                 template_window: float = DEFAULT_WINDOW) -> None:
        """``cpu_forward_batch``: on CPU the model runs in chunks this small, because per-spectrum cost grows with the
        batch beyond a few dozen (CPU time per spectrum, default preset, one thread: 5.5 ms at 16-32, 9.6 ms at 256).
        ``threads``: torch intra-op threads (None: torch's default, one per core).
        ``templates``: refine the redshift with this bank (None: the network's redshift as is), matching only
        templates of the network's ``template_top_k`` most probable classes (None: all), within ``template_window``
        in ln(1 + z) of the network's redshift. The bank must fit the checkpoint's grid and the checkpoint must use
        continuum normalisation (the refinement correlates continuum-removed spectra)."""
        if templates is not None:
            check_bank_fits(templates, checkpoint)
        ood = checkpoint.calibration.ood
        if ood is not None and ood.mean.shape != (checkpoint.model_config.n_bins,):
            raise CheckpointError(f"checkpoint {checkpoint.name} {checkpoint.version}: its out-of-distribution model "
                                  f"has {ood.mean.shape[0]} bins, the model {checkpoint.model_config.n_bins}")
        if template_top_k is not None and not 1 <= template_top_k <= len(checkpoint.taxonomy):
            raise ConfigError(f"template_top_k must lie in 1..{len(checkpoint.taxonomy)} or be None, "
                              f"got {template_top_k!r}")
        self.templates = templates
        self.template_top_k = template_top_k
        self.template_window = template_window
        self.checkpoint = checkpoint
        self.device = select_device(device)
        self.max_forward_batch = (max_forward_batch if self.device.type == "cuda"
                                  else min(max_forward_batch, cpu_forward_batch))
        if threads is not None:
            torch.set_num_threads(threads)
        self.taxonomy = checkpoint.taxonomy
        self.model = checkpoint.build_model().to(self.device).eval()
        self._pin = self.device.type == "cuda"
        if warmup:
            self.predict_arrays(np.zeros((min(4, max_forward_batch), 2, checkpoint.model_config.n_bins), np.float32))

    def predict(self, batch: Sequence[Prepared]) -> list[Prediction]:
        if not batch:
            return []
        x = np.stack([p.model_input() for p in batch])  # [B, 2, n_bins]
        return self.predict_arrays(x)

    def predict_arrays(self, x: np.ndarray) -> list[Prediction]:
        """``x``: float32 [B, 2, n_bins] (normalised flux, coverage)."""
        out: list[Prediction] = []
        start = 0
        while start < len(x):
            chunk = x[start:start + self.max_forward_batch]
            try:
                out.extend(self._run(chunk))
            except torch.cuda.OutOfMemoryError:
                if self.max_forward_batch == 1:
                    raise
                self.max_forward_batch = max(1, self.max_forward_batch // 2)
                log.warning("CUDA out of memory; maximum batch size halved to %d", self.max_forward_batch)
                torch.cuda.empty_cache()
                continue
            start += len(chunk)
        if self.templates is not None and out:
            out = self._refine(x, out, self.templates)  # once per call: the refinement amortises over the batch
        return out

    def _run(self, chunk: np.ndarray) -> list[Prediction]:
        host = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))
        if self._pin:
            host = host.pin_memory()
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.device.type == "cuda"):
            out = self.model(host.to(self.device, non_blocking=True))
            logits = out.logits.float().cpu().numpy()
            z = out.z_mean.float().cpu().numpy()
            z_err = torch.exp(0.5 * out.z_logvar.float()).cpu().numpy()
        probs = self.checkpoint.probabilities(logits)
        if not (np.isfinite(probs).all() and np.isfinite(z).all() and np.isfinite(z_err).all()):
            # The daemon splits the batch to find the spectrum responsible and dead-letters it alone.
            raise ValueError("model produced non-finite outputs")
        n = len(self.taxonomy)
        entropy = -(probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=1) / math.log(n)
        calibration = self.checkpoint.calibration
        has_thresholds = bool(calibration.thresholds)
        outside = (np.zeros(len(chunk), dtype=bool) if calibration.ood is None
                   else calibration.ood.flag(chunk[:, 0]))  # on the input's flux channel, as it was fitted
        preds = []
        for p, zi, ei, h, far in zip(probs, z, z_err, entropy, outside):
            top = int(p.argmax())
            top_class, top_probability = self.taxonomy[top], float(p[top])
            preds.append(Prediction(
                probabilities={c: float(v) for c, v in zip(self.taxonomy, p)},
                top_class=top_class, top_probability=top_probability,
                z=float(max(zi, 0.0)), z_err=float(ei), ood_score=float(h),
                confident=calibration.confident(top_class, top_probability) if has_thresholds else None,
                out_of_distribution=bool(far),
            ))
        return preds

    def _refine(self, x: np.ndarray, preds: list[Prediction], bank: TemplateBank) -> list[Prediction]:
        """The network's predictions with their redshifts refined by ``bank`` where a template matches well,
        templates limited to each spectrum's ``template_top_k`` most probable classes."""
        classes = None
        if self.template_top_k is not None:
            classes = [sorted(p.probabilities, key=p.probabilities.__getitem__, reverse=True)[:self.template_top_k]
                       for p in preds]
        z_net = np.array([p.z for p in preds])
        refined = refine_redshift(x[:, 0], x[:, 1] > 0.5, z_net, bank, self.checkpoint.preprocess.grid,
                                  window=self.template_window, classes=classes)
        out = []
        for i, p in enumerate(preds):
            match = refined.match(i, bank)
            out.append(p if match is None else replace(
                p, z=float(max(refined.z[i], 0.0)), z_err=float(refined.z_err[i]), z_method=METHOD_TEMPLATE,
                template=match))
        return out
