"""The training loop's parts, in the order a run meets them; ``train`` (the recipe) and ``ablation`` (the variants)
both run on them, so one network trains the same way in either.

    config -> device -> data (seeded samples that retry within their class, endless seeded batches, class weights)
           -> network (weights, EMA, AdamW groups) -> one step (LR, bf16 autocast, focal + Gaussian NLL, clip,
              skip non-finite, EMA) -> evaluation (EMA weights over a fixed simulated set)

``TrainConfig`` is the one training config (a YAML file plus ``--set`` overrides) for both scripts.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from spectranet.streamer.errors import ConfigError, PreprocessError
from spectranet.streamer.science.model import PRESETS, SpectraNet
from spectranet.streamer.science.preprocess import Normalisation
from spectranet.streamer.science.taxonomy import CLASSES
from spectranet.training import metrics as M
from spectranet.training.data import Spectrum
from spectranet.training.losses import class_balanced_weights, focal_loss, gaussian_nll, lr_at

__all__ = ["TrainConfig", "parse_overrides", "pick_device", "SimulatedSet", "sampling_weights", "batch_keys", "batches",
           "class_weights", "Trainee", "ema_update", "schedule_step", "learning_rate", "out_of_time", "StepLosses",
           "train_step", "predict", "val_metrics"]


# ----------------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training or ablation run reads: a YAML file (``from_yaml``) plus ``--set`` overrides."""

    manifest: str = "../shared/data/manifest.csv"
    spectra_pack: str = ""             # a data.save_pack file to read instead of the manifest (GPU hosts)
    out_dir: str = "runs/default"
    name: str = "spectranet-sedm"
    version: str = "0.1.0"
    preset: str = "default"
    pooling: str = ""                  # "" keeps the preset's; "max" or "multiscale" overrides it (see ablation)
    norm: str = ""                     # "" keeps the preset's; "layer" or "batch" overrides it (see ablation)
    two_networks: bool = False         # the paper's redshift network + rest-frame classifier (ModelConfig)
    # Two networks: what redshift the classifier's rest-frame view uses in training. A classifier trained on exact
    # redshifts loses a third of its macro-F1 on the redshift network's estimates (0.2.0: 0.48 -> 0.34), so a share
    # of each batch sees the network's own (detached) estimate and the rest the true z jittered by z_noise in ln(1+z).
    z_noise: float = 0.0
    pred_z_fraction: float = 0.0
    z_pool_prob: float = 0.0           # share of re-drawn training redshifts from the class's real ones (SimConfig)
    keep_source_z: float = -1.0        # chance an observed spectrum keeps its own z (SimConfig); < 0: SimConfig's 0.3
    # Same-class mixing: a ``mix_prob`` share of the draws of a class with at most ``mix_max_objects`` training
    # objects is a rest-frame blend of the spectrum with one of another object of its class (simulate.mix_spectra).
    mix_prob: float = 0.0
    mix_max_objects: int = 150
    # Object balance: a spectrum of an object with n training spectra is drawn with weight n ** -object_balance,
    # renormalised within its class so that the class mix (and the focal loss's class weights) stay as they are. 0:
    # every spectrum alike (half the training spectra belong to the 3% of objects with more than 10); 1: every object
    # of a class alike (``sampling_weights``).
    object_balance: float = 0.0
    init_from: str = ""                # a checkpoint whose weights start the run (fine-tuning); ignored on resume
    normalisation: Normalisation = "continuum"  # SNID-style: flattened templates and calibrated spectra meet here
    seed: int = 0
    split_seed: int = 0
    object_names: str = "v2"           # how spectra are grouped into objects for the split (training.data.object_key)
    val_fraction: float = 0.2
    val_repeats: int = 2               # simulated SEDM draws per validation spectrum
    val_seed: int = 12345
    max_spectra: int = 0               # 0: all; else a seeded subsample (smoke tests)
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 200
    max_steps: int = 4000
    eval_every: int = 250
    patience: int = 8                  # evaluations without a better val macro-F1 before stopping
    ema_decay: float = 0.995
    focal_gamma: float = 2.0
    cb_beta: float = 0.9999
    z_weight: float = 1.0
    grad_clip: float = 1.0
    num_workers: int = 0
    time_limit_min: float = 0.0        # 0: none; else stop (and export the best) after this many minutes
    keep_snapshots: bool = False       # also keep the EMA weights of every evaluation (snapshots/step-N.pt), to average
    resume: bool = True
    device: str = "auto"
    threads: int = 2
    # bf16 autocast in the training step on CPU as well as on CUDA (always there): on a CPU with AMX or AVX512-BF16
    # a step of the default preset takes 0.7x the time (bench on the dev machine: 896 vs 1,248 ms per batch of 64);
    # elsewhere it is slower, so off by default. Validation and export stay float32.
    bf16_cpu: bool = False

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.pooling not in ("", "max", "multiscale"):
            raise ConfigError(f"pooling must be '', 'max' or 'multiscale', got {self.pooling!r}")
        if self.norm not in ("", "layer", "batch"):
            raise ConfigError(f"norm must be '', 'layer' or 'batch', got {self.norm!r}")
        if self.batch_size < 1 or self.max_steps < 1 or self.eval_every < 1:
            raise ConfigError("batch_size, max_steps and eval_every must be >= 1")
        if not 0.0 <= self.pred_z_fraction <= 1.0 or self.z_noise < 0.0:
            raise ConfigError(f"pred_z_fraction must lie in [0, 1] and z_noise be >= 0, got {self.pred_z_fraction} "
                              f"and {self.z_noise}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")
        if not 0.0 <= self.object_balance <= 1.0:
            raise ConfigError(f"object_balance must lie in [0, 1], got {self.object_balance}")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        data.update(overrides)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"{path}: unknown training config keys {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_checkpoint(cls, card: Mapping[str, Any], **overrides: Any) -> TrainConfig:
        """The config a checkpoint was trained with (its card's ``train_config``, as ``Checkpoint.extra`` holds it),
        with ``overrides`` (say, where the manifest is on this host): evaluation and calibration rebuild the
        checkpoint's own split from it. Keys this code no longer knows (older checkpoints) are left out."""
        known = {f.name for f in fields(cls)}
        stored = {k: v for k, v in card.get("train_config", {}).items() if k in known}
        if "train_config" in card and "object_names" not in card["train_config"]:
            stored["object_names"] = "v1"  # trained before object_key: rebuild the split it was trained on
        return cls(**{**stored, **overrides})


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` to typed ``TrainConfig`` values, for ``--set`` on the command line.

    Each value takes the type of the key's default (so ``lr=3e-4`` is a float, which YAML 1.1 would leave a string).
    """
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        if key not in defaults:
            raise ConfigError(f"--set {key}: unknown training config key")
        default = defaults[key]
        try:
            if isinstance(default, bool):
                value: Any = yaml.safe_load(raw)
                if not isinstance(value, bool):
                    raise ValueError("expected true or false")
            elif isinstance(default, (int, float)):
                value = type(default)(raw)
            else:
                value = raw
        except ValueError as exc:
            raise ConfigError(f"--set {key}={raw!r}: {exc}") from exc
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------------- device


def pick_device(cfg: TrainConfig) -> torch.device:
    """CUDA when asked for (or "auto") and present, else CPU; thread count and seeds set for the run."""
    device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    torch.set_num_threads(cfg.threads)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input shapes: pick the fastest kernels once
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    return device


# ------------------------------------------------------------------------------------------------------------- data


class SimulatedSet(torch.utils.data.Dataset):
    """Item (epoch, i): ``draw(spectrum i, rng)`` with the rng seeded by (seed, epoch, i), as (x, class, z).

    The one home of the sample retry: a spectrum that cannot be drawn (``PreprocessError``) yields the next one of its
    class, so a batch keeps its class mix and a resumed run draws exactly the samples the interrupted one would have.
    Subclasses say what one draw is (``train``: one SEDM input; ``ablation``: one observation, several inputs).
    """

    def __init__(self, spectra: list[Spectrum], galaxies: list, seed: int) -> None:
        self.spectra, self.galaxies, self.seed = spectra, galaxies, seed
        self.targets = np.array([CLASSES.index(s.label) for s in spectra])  # [N] class indices

    def __len__(self) -> int:
        return len(self.spectra)

    def draw(self, spectrum: Spectrum, rng: np.random.Generator) -> tuple[Any, float]:
        """(model input, z) of one simulated observation; ``PreprocessError`` when this spectrum cannot give one."""
        raise NotImplementedError

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int, float]:
        epoch, i = key
        rng = np.random.default_rng([self.seed, epoch, i])
        for k in range(len(self.spectra)):
            j = (i + k) % len(self.spectra)
            if self.targets[j] != self.targets[i]:
                continue
            try:
                x, z = self.draw(self.spectra[j], rng)
            except PreprocessError:
                continue
            return x, int(self.targets[j]), float(z)
        raise PreprocessError(f"no spectrum of class {CLASSES[self.targets[i]]} can be simulated", field="flux")


def sampling_weights(objects: Sequence[str], targets: np.ndarray, power: float) -> np.ndarray | None:
    """[N] draw probabilities: spectrum i weighs n_obj(i) ** -power (n_obj: its object's spectra), scaled within each
    class so that the class's share of the draws stays its share of the spectra; None for power 0 (uniform)."""
    if power == 0:
        return None
    _, inverse, counts = np.unique(np.asarray(objects), return_inverse=True, return_counts=True)
    w = counts[inverse].astype(np.float64) ** -power
    for c in np.unique(targets):
        in_c = targets == c
        w[in_c] *= in_c.sum() / w[in_c].sum()
    return w / w.sum()


def batch_keys(n: int, batch_size: int, seed: int, start_step: int, rank: int = 0, world: int = 1,
               p: np.ndarray | None = None) -> Iterator[list[tuple[int, int]]]:
    """Endless batches of (epoch, index) keys: a seeded permutation per epoch, resumable at any step; with draw
    probabilities ``p`` [n] each epoch is instead n seeded draws with replacement from ``p``."""
    per_epoch = max(1, n // batch_size)
    step = start_step
    while True:
        epoch, k = divmod(step, per_epoch)
        rng = np.random.default_rng([seed, epoch])
        perm = rng.permutation(n) if p is None else rng.choice(n, size=n, p=p)
        idx = perm[k * batch_size:(k + 1) * batch_size]
        yield [(epoch, int(i)) for i in idx[rank::world]]
        step += 1


def batches(dataset: SimulatedSet, cfg: TrainConfig, device: torch.device, *, start_step: int = 0, rank: int = 0,
            world: int = 1) -> Iterator[Any]:
    """Endless collated batches (x, y [B], z [B]) from ``start_step`` on; this process's share of each global batch."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_keys(len(dataset), cfg.batch_size, cfg.seed, start_step, rank, world,
                                          p=sampling_weights([s.object_id for s in dataset.spectra], dataset.targets,
                                                             cfg.object_balance)),
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
        worker_init_fn=lambda _: torch.set_num_threads(1))
    return iter(loader)


def class_weights(dataset: SimulatedSet, cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """[C] class-balanced focal-loss weights from the training set's class counts."""
    counts = np.bincount(dataset.targets, minlength=len(CLASSES))
    return class_balanced_weights(counts.tolist(), cfg.cb_beta).to(device)


# ---------------------------------------------------------------------------------------------------------- network


@dataclass
class Trainee:
    """A network in training: weights, their EMA (what validation sees and what is exported), the optimiser, and
    the losses it takes (the ablation's two networks each take one)."""

    model: SpectraNet
    ema: SpectraNet
    optimizer: torch.optim.AdamW
    net: torch.nn.Module  # what the forward pass calls: ``model``, or its DistributedDataParallel wrapper
    classify: bool = True
    redshift: bool = True

    @classmethod
    def create(cls, model: SpectraNet, cfg: TrainConfig, *, classify: bool = True, redshift: bool = True) -> Trainee:
        """``model`` (on its device) with a frozen EMA copy and AdamW: no weight decay on biases and norms."""
        ema = copy.deepcopy(model).eval()
        for p in ema.parameters():
            p.requires_grad_(False)
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
        return cls(model, ema, optimizer, model, classify, redshift)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """Move the EMA weights towards the model's; buffers (BatchNorm statistics) are copied as they are."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


# --------------------------------------------------------------------------------------------------------- one step


def schedule_step(step: int, elapsed_s: float, cfg: TrainConfig) -> int:
    """The step the LR schedule is at: with a wall-clock budget, the cosine ends when either steps or time run out.

    On a shared CPU the speed is unknown in advance; a cosine laid out over ``max_steps`` that the time limit cuts
    short would stop at a high learning rate. Warm-up always counts real steps.
    """
    if cfg.time_limit_min <= 0 or step < cfg.warmup_steps:
        return step
    return max(step, int(min(1.0, elapsed_s / (60.0 * cfg.time_limit_min)) * cfg.max_steps))


def learning_rate(step: int, elapsed_s: float, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay, laid over steps or the time budget (``schedule_step``)."""
    return lr_at(schedule_step(step, elapsed_s, cfg), base_lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                 max_steps=cfg.max_steps)


def out_of_time(elapsed_s: float, cfg: TrainConfig) -> bool:
    return cfg.time_limit_min > 0 and elapsed_s > 60 * cfg.time_limit_min


@dataclass(frozen=True)
class StepLosses:
    """One step's numbers, for the progress bar and the history."""

    loss: float            # what was minimised: classification + z_weight * redshift
    classification: float  # class-balanced focal loss (0 for a network that does not classify)
    redshift: float        # Gaussian NLL of z (0 for a network that does not estimate it)
    accuracy: float        # of this batch's arg-max class
    applied: bool          # False: loss or gradient not finite, the step was skipped


@contextlib.contextmanager
def _dropout_seed(seed: int | None, device: torch.device) -> Iterator[None]:
    """With a seed, dropout draws from its own RNG stream (the ablation's common random numbers: every variant
    draws the same masks at a given step) and the global stream is left as it was."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def train_step(t: Trainee, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, *, lr: float, weights: torch.Tensor,
               cfg: TrainConfig, z_in: torch.Tensor | None = None, dropout_seed: int | None = None) -> StepLosses:
    """One optimiser step on x [B, 2, n_bins], y [B], z [B]; ``z_in`` [B] is the redshift the rest-frame view uses
    (two networks; NaN rows: the network's own). A non-finite loss or gradient skips the update, so one bad batch
    cannot poison the weights; the EMA follows every update."""
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    t.net.train()
    with _dropout_seed(dropout_seed, x.device):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda" or cfg.bf16_cpu):
            out = t.net(x, z_in)                   # logits [B, C], z_mean [B], z_logvar [B]
    zero = torch.zeros((), device=x.device)
    loss_cls = focal_loss(out.logits.float(), y, weights, cfg.focal_gamma) if t.classify else zero
    loss_z = gaussian_nll(out.z_mean.float(), out.z_logvar.float(), z) if t.redshift else zero
    loss = loss_cls + cfg.z_weight * loss_z
    t.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(t.model.parameters(), cfg.grad_clip)
    applied = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))
    if applied:
        t.optimizer.step()
        ema_update(t.ema, t.model, cfg.ema_decay)
    accuracy = (out.logits.argmax(1) == y).float().mean()
    return StepLosses(loss=loss.item(), classification=loss_cls.item(), redshift=loss_z.item(),
                      accuracy=accuracy.item(), applied=applied)


# ------------------------------------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def predict(model: SpectraNet, x: np.ndarray, device: torch.device, batch: int = 256,
            z: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Logits [N, C], z mean [N] and z sigma [N] of ``model`` (eval mode) over x [N, 2, n_bins].

    ``z`` [N] (two networks): the redshifts the classifier's rest-frame views use instead of the network's own
    (NaN: its own), to measure what redshift errors cost the classification."""
    model.eval()
    logits, zm, zs = [], [], []
    for k in range(0, len(x), batch):
        xb = torch.from_numpy(x[k:k + batch]).to(device)         # [b, 2, n_bins]
        zb = None if z is None else torch.as_tensor(z[k:k + batch], dtype=torch.float32, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(xb, zb)
        logits.append(out.logits.float().cpu())                  # [b, C]
        zm.append(out.z_mean.float().cpu())                      # [b]
        zs.append(torch.exp(0.5 * out.z_logvar.float()).cpu())   # [b] sigma
    return {"logits": torch.cat(logits).numpy(), "z": torch.cat(zm).clamp_min(0).numpy(),
            "z_err": torch.cat(zs).numpy()}


def val_metrics(pred: dict[str, np.ndarray], y: np.ndarray, z: np.ndarray, temperature: float = 1.0) -> dict:
    """Classification report, redshift statistics and ECE of ``predict``'s output against labels y [N], z [N]."""
    probs = M.softmax(pred["logits"], temperature)
    out = M.classification_report(y, probs, CLASSES)
    out["redshift"] = M.redshift_stats(pred["z"], z)
    out["ece"] = M.expected_calibration_error(probs, y)
    return out
