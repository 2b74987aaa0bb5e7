"""Batched inference: one resident model, the same code path on CPU and GPU.

The model is loaded once, put in eval mode and warmed up; each call stacks prepared spectra into a pinned host
buffer, copies it to the device without blocking, and runs under ``inference_mode`` (bf16 autocast on CUDA; on CPU
float32, or bf16 where asked: ``resolve_precision``). When the GPU runs out of memory the batch is split and the
maximum batch size halves for the rest of the run.

With a template bank (``templates=``) the network's redshift becomes a prior that template cross-correlation refines
on the CPU (``spectranet.streamer.science.templates``): ``Prediction.z`` is then the refined redshift where a template
matched well (``z_method == "template"``, ``template`` names it) and the network's otherwise; ``z_network`` always
keeps the network's own estimate. Where the refined redshift moved at least ``RECLASSIFY_SHIFT`` (0.02) in ln(1 + z)
from the network's, a two-network model's classifier runs again on the rest frame of the refined redshift, and the
probabilities are those. Measured with 0.4.0 on its 1,935 real-degraded validation spectra (calibration cross-fitted
by object halves; 29% of them classified again, +0.6 ms per spectrum): Ia vs non-Ia 0.830 -> 0.847, H-rich vs H-poor
0.858 -> 0.864, macro-F1 0.389 -> 0.402, Ia purity at 90% completeness 0.822 -> 0.835; classifying every refined
spectrum again (78%) gained no more, and on the simulated set either was within 0.01 of the network's own rest frame.

The checkpoint's calibration (``Checkpoint.calibration``) adds the two decisions an astronomer acts on, computed here so
that the daemon and ``spectranet classify`` apply the same rule: ``confident`` (the top class's probability reaches its
class's purity threshold; None for a checkpoint without thresholds) and ``out_of_distribution`` (the input flux looks
like no class of the taxonomy; False for a checkpoint without an out-of-distribution model). Beside the most probable
class, ``called_class`` is the one called down the taxonomy's tree (Ia or not first: ``taxonomy.hierarchical_call``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from spectranet.streamer.errors import CheckpointError, ConfigError
from spectranet.streamer.science.checkpoint import Checkpoint
from spectranet.streamer.science.preprocess import Prepared
from spectranet.streamer.science.taxonomy import hierarchical_call
from spectranet.streamer.science.templates import (
    DEFAULT_WINDOW,
    METHOD_NETWORK,
    METHOD_TEMPLATE,
    Refinement,
    TemplateBank,
    TemplateMatch,
    default_template_bank_path,
    load_template_bank,
    refine_redshift,
)

__all__ = ["Prediction", "EngineOutputs", "InferenceEngine", "RECLASSIFY_SHIFT", "select_device", "check_bank_fits",
           "TEMPLATES_DEFAULT", "TEMPLATES_OFF", "resolve_template_bank", "PRECISIONS", "resolve_precision"]

TEMPLATES_DEFAULT = ""     # the template bank shipped in the package
RECLASSIFY_SHIFT = 0.02    # ln(1 + z): a refined redshift this far from the network's is classified again (docstring)
TEMPLATES_OFF = "none"     # no template refinement

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class EngineOutputs:
    """Per-spectrum arrays of one ``InferenceEngine.outputs`` call, length B."""

    logits: np.ndarray              # [B, C] of the classification the predictions report (at the final z)
    z: np.ndarray                   # final redshift (template-refined where a template matched, else the network's)
    z_err: np.ndarray
    z_network: np.ndarray           # the network's own redshift (>= 0)
    z_network_err: np.ndarray
    refinement: Refinement | None   # None without a template bank
    reclassified: np.ndarray        # bool: classified again at the refined redshift (or the given prior)
    out_of_distribution: np.ndarray  # bool


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
    called_class: str = ""           # the class called down the taxonomy's tree (hierarchical_call); "": top_class

    def __post_init__(self) -> None:
        if math.isnan(self.z_network):
            object.__setattr__(self, "z_network", self.z)
        if not self.called_class:
            object.__setattr__(self, "called_class", self.top_class)
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


PRECISIONS = ("auto", "float32", "bfloat16")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions natively (AMX or AVX512-BF16, as oneDNN sees it)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def resolve_precision(requested: str, device: torch.device) -> torch.dtype:
    """The dtype the network computes in. ``auto``: bf16 on CUDA, float32 on CPU, where the shipped model's
    calibration and validation numbers were measured. ``bfloat16`` on a CPU with native bf16 (AMX or AVX512-BF16)
    halves the model's time: 0.8.0 on its 1,935 real-degraded validation spectra through the engine, 9.7 s instead of
    19.0 s on the dev machine's AMX CPU, with 1.5% of the top classes changed (macro-F1 0.406 -> 0.400, Ia vs non-Ia
    0.858 -> 0.857, ECE 0.027 -> 0.026, mean of 8 cross-fitted object halvings; 0.9.1 with its float32 calibration: 9
    of the 1,935 top classes changed, and the daemon end to end 215-222 instead of 172-187 spectra/s on the 2-core
    machine); on a CPU without it bf16 is emulated and slower than float32 (a warning says so)."""
    if requested not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "float32" or (requested == "auto" and device.type == "cpu"):
        return torch.float32
    if device.type == "cpu" and not cpu_has_native_bf16():
        log.warning("precision bfloat16 on a CPU without native bf16 (AMX/AVX512-BF16): emulated, slower than float32")
    return torch.bfloat16


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
                 template_window: float = DEFAULT_WINDOW, precision: str = "auto") -> None:
        """``cpu_forward_batch``: on CPU the model runs in chunks this small, because per-spectrum cost grows with the
        batch beyond a few dozen (CPU time per spectrum, default preset, one thread: 5.5 ms at 16-32, 9.6 ms at 256).
        ``threads``: torch intra-op threads (None: torch's default, one per core).
        ``templates``: refine the redshift with this bank (None: the network's redshift as is), matching only
        templates of the ``template_top_k`` classes with the largest logits (None: all), within ``template_window``
        in ln(1 + z) of the network's redshift. The bank must fit the checkpoint's grid and the checkpoint must use
        continuum normalisation (the refinement correlates continuum-removed spectra). ``precision``: ``auto``,
        ``float32`` or ``bfloat16`` (``resolve_precision``)."""
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
        self.dtype = resolve_precision(precision, self.device)
        self.max_forward_batch = (max_forward_batch if self.device.type == "cuda"
                                  else min(max_forward_batch, cpu_forward_batch))
        if threads is not None:
            torch.set_num_threads(threads)
        self.taxonomy = checkpoint.taxonomy
        self.model = checkpoint.build_model().to(self.device).eval()
        self._pin = self.device.type == "cuda"
        if warmup:
            self.predict_arrays(np.zeros((min(4, max_forward_batch), 2, checkpoint.model_config.n_bins), np.float32))

    def predict(self, batch: Sequence[Prepared], z_prior: Sequence[float] | None = None) -> list[Prediction]:
        """``z_prior``: per spectrum a known redshift (a host galaxy's, a packet's ``redshift_prior``) or NaN; see
        ``outputs``."""
        if not batch:
            return []
        x = np.stack([p.model_input() for p in batch])  # [B, 2, n_bins]
        return self.predict_arrays(x, None if z_prior is None else np.asarray(z_prior, dtype=np.float64))

    def predict_arrays(self, x: np.ndarray, z_prior: np.ndarray | None = None) -> list[Prediction]:
        """``x``: float32 [B, 2, n_bins] (normalised flux, coverage); ``z_prior`` [B] or None: see ``outputs``."""
        if not len(x):
            return []
        out = self.outputs(x, z_prior)
        probs = self.checkpoint.probabilities(out.logits)
        n = len(self.taxonomy)
        entropy = -(probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=1) / math.log(n)
        calibration = self.checkpoint.calibration
        has_thresholds = bool(calibration.thresholds)
        calls = hierarchical_call(probs, self.taxonomy)
        preds = []
        for i, p in enumerate(probs):
            top = int(p.argmax())
            top_class, top_probability = self.taxonomy[top], float(p[top])
            match = None if out.refinement is None or self.templates is None else \
                out.refinement.match(i, self.templates)
            preds.append(Prediction(
                probabilities={c: float(v) for c, v in zip(self.taxonomy, p)},
                top_class=top_class, top_probability=top_probability,
                z=float(out.z[i]), z_err=float(out.z_err[i]), ood_score=float(entropy[i]),
                z_network=float(out.z_network[i]), z_method=METHOD_NETWORK if match is None else METHOD_TEMPLATE,
                template=match,
                confident=calibration.confident(top_class, top_probability) if has_thresholds else None,
                out_of_distribution=bool(out.out_of_distribution[i]), called_class=self.taxonomy[int(calls[i])],
            ))
        return preds

    def outputs(self, x: np.ndarray, z_prior: np.ndarray | None = None) -> EngineOutputs:
        """The arrays behind ``predict_arrays``: the network on every spectrum; with a template bank, its redshift
        refined and, where the refined redshift moved at least ``RECLASSIFY_SHIFT`` in ln(1 + z), the classifier run
        again on the rest frame of the refined redshift (two-network models). ``spectranet.training`` calibrates and
        evaluates on exactly these logits.

        ``z_prior`` [B] (NaN: none): a redshift known from elsewhere. A two-network model classifies on its rest frame
        (again only where it lies ``RECLASSIFY_SHIFT`` or more from the network's); the reported redshifts stay the
        network's and the templates' (the annotation reports the prior as the redshift, method ``prior``)."""
        if z_prior is not None and np.shape(z_prior) != (len(x),):
            raise ValueError(f"z_prior must hold one redshift (or NaN) per spectrum: shape {np.shape(z_prior)} "
                             f"for {len(x)} spectra")
        logits, z, z_err = self._chunked(self._network, x)
        if not (np.isfinite(logits).all() and np.isfinite(z).all() and np.isfinite(z_err).all()):
            # The daemon splits the batch to find the spectrum responsible and dead-letters it alone.
            raise ValueError("model produced non-finite outputs")
        z_network = np.maximum(z, 0.0)
        ood = self.checkpoint.calibration.ood
        outside = np.zeros(len(x), dtype=bool) if ood is None else ood.flag(x[:, 0])  # input flux, as fitted
        refinement, final_z, final_err = None, z_network, z_err
        again = np.zeros(len(x), dtype=bool)
        if self.templates is not None:
            classes = None
            if self.template_top_k is not None:
                # the network's own order (its logits, before the class bias): the refinement, and so the logits
                # the calibration is fitted on, then do not depend on the calibration
                order = np.argsort(-logits, axis=1, kind="stable")[:, :self.template_top_k]
                classes = [[self.taxonomy[j] for j in row] for row in order]
            refinement = refine_redshift(x[:, 0], x[:, 1] > 0.5, z_network, self.templates,
                                         self.checkpoint.preprocess.grid, window=self.template_window,
                                         classes=classes)
            used = refinement.method == METHOD_TEMPLATE
            final_z = np.where(used, np.maximum(refinement.z, 0.0), z_network)
            final_err = np.where(used, refinement.z_err, z_err)
        classify_z = final_z
        if z_prior is not None:
            known = np.isfinite(z_prior)
            classify_z = np.where(known, np.maximum(np.nan_to_num(z_prior), 0.0), final_z)
        if self.checkpoint.model_config.two_networks:
            again = np.abs(np.log1p(classify_z) - np.log1p(z_network)) >= RECLASSIFY_SHIFT
            if again.any():
                (redone,) = self._chunked(self._classify_at, x[again], classify_z[again])
                if not np.isfinite(redone).all():
                    raise ValueError("model produced non-finite outputs")
                logits = logits.copy()
                logits[again] = redone
        return EngineOutputs(logits=logits, z=final_z, z_err=final_err, z_network=z_network, z_network_err=z_err,
                             refinement=refinement, reclassified=again, out_of_distribution=outside)

    def _chunked(self, fn: Callable[..., tuple[np.ndarray, ...]], *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """``fn`` over chunks of at most ``max_forward_batch`` rows, results concatenated; when CUDA runs out of
        memory the chunk is retried at half the size, and the maximum stays halved for the rest of the run."""
        parts: list[tuple[np.ndarray, ...]] = []
        start, n = 0, len(arrays[0])
        while start < n:
            stop = start + self.max_forward_batch
            try:
                parts.append(fn(*(a[start:stop] for a in arrays)))
            except torch.cuda.OutOfMemoryError:
                if self.max_forward_batch == 1:
                    raise
                self.max_forward_batch = max(1, self.max_forward_batch // 2)
                log.warning("CUDA out of memory; maximum batch size halved to %d", self.max_forward_batch)
                torch.cuda.empty_cache()
                continue
            start = stop
        return tuple(np.concatenate(cols) for cols in zip(*parts))

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        if self._pin:
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)

    def _network(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits [b, C], z [b], z_err [b]) of the whole network."""
        with torch.inference_mode(), self._autocast():
            out = self.model(self._to_device(chunk))
            return (out.logits.float().cpu().numpy(), out.z_mean.float().cpu().numpy(),
                    torch.exp(0.5 * out.z_logvar.float()).cpu().numpy())

    def _classify_at(self, chunk: np.ndarray, z: np.ndarray) -> tuple[np.ndarray]:
        """Logits [b, C] of the classifier on the rest frame of redshifts ``z`` [b]."""
        with torch.inference_mode(), self._autocast():
            logits = self.model.classify_at(self._to_device(chunk), self._to_device(z))
            return (logits.float().cpu().numpy(),)
