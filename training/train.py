"""Train SpectraNet on simulated SEDM spectra: ``spectranet train --config training/configs/default.yaml``.

The paper's recipe (arXiv:2510.07215), top to bottom: config -> device -> data (object-held-out split, on-the-fly
SEDM simulation through the inference preprocessing) -> model -> AdamW with linear warm-up and cosine decay ->
loop (class-balanced focal loss, gamma 2, beta 0.9999, plus the redshift head's Gaussian NLL; gradient clipping at
1.0; an EMA of the weights, decay 0.995, is what validation sees and what is exported; bf16 autocast on GPU only) ->
early stopping on validation macro-F1 -> temperature fitted on validation -> export a checkpoint that
``spectranet.streamer.science.checkpoint.load_checkpoint`` and ``spectranet.streamer.science.inference.InferenceEngine`` use as is.

The network reads observer-frame input (packets rarely carry a redshift): one multi-task network, or with
``two_networks`` (the shipped model, chosen by ``spectranet.training.ablation``) a redshift network whose classifier sees the
rest frame of the predicted z at validation and inference, and in training of the true z (jittered by ``z_noise``)
or, for a ``pred_z_fraction`` share, of its own estimate. The validation set is
simulated once with a fixed seed, so every evaluation scores the same inputs; training samples are seeded by (seed,
epoch, index), so a resumed run draws exactly the samples the interrupted run would have.

Resume: ``out_dir/state.pt`` is written at every evaluation; a run whose ``out_dir`` holds one continues from it
(``resume: false`` starts over). Fine-tune: ``init_from`` starts a fresh run (new optimiser and schedule) from a
checkpoint's weights.

Multi-GPU (documented, not tested; single-process is what the tests run): launch with
``torchrun --standalone --nproc_per_node=N -m spectranet.training.train --config FILE``. With ``WORLD_SIZE > 1`` each process
joins the NCCL process group, wraps the model in ``DistributedDataParallel``, and takes every N-th index of each
global batch (so ``batch_size`` is the global batch); rank 0 alone evaluates, checkpoints and exports, and broadcasts
the early-stopping decision.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import yaml
from spectranet.streamer.errors import ConfigError, PreprocessError
from spectranet.streamer.science.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from spectranet.streamer.science.model import PRESETS, ModelConfig, SpectraNet, count_parameters
from spectranet.streamer.science.preprocess import PreprocessConfig
from spectranet.streamer.science.taxonomy import CLASSES, TAXONOMY_VERSION
from spectranet.training import metrics as M
from spectranet.training.data import (
    Spectrum,
    counts_table,
    load_galaxies,
    load_pack,
    load_spectra,
    read_manifest,
    split_by_object,
)
from spectranet.training.losses import class_balanced_weights, focal_loss, gaussian_nll, lr_at
from spectranet.training.simulate import SEDM_DEFAULT, simulate_input
from tqdm import tqdm

_RANGE = PreprocessConfig().grid  # the model's wavelength range (streamer's default grid); bins follow the preset

__all__ = ["TrainConfig", "train", "load_split", "simulate_set", "predict", "val_metrics", "model_config",
           "schedule_step", "parse_overrides", "ema_update", "main"]


# ----------------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TrainConfig:
    manifest: str = "../shared/data/manifest.csv"
    spectra_pack: str = ""             # a spectranet.training.data.save_pack file to read instead of the manifest (GPU hosts)
    out_dir: str = "runs/default"
    name: str = "spectranet-sedm"
    version: str = "0.1.0"
    preset: str = "default"
    pooling: str = ""                  # "" keeps the preset's; "max" or "multiscale" overrides it (spectranet.training.ablation)
    norm: str = ""                     # "" keeps the preset's; "layer" or "batch" overrides it (spectranet.training.ablation)
    two_networks: bool = False         # the paper's redshift network + rest-frame classifier (ModelConfig)
    # Two networks: what redshift the classifier's rest-frame view uses in training. A classifier trained on exact
    # redshifts loses a third of its macro-F1 on the redshift network's estimates (0.2.0: 0.48 -> 0.34), so a share
    # of each batch sees the network's own (detached) estimate and the rest the true z jittered by z_noise in ln(1+z).
    z_noise: float = 0.0
    pred_z_fraction: float = 0.0
    init_from: str = ""                # a checkpoint whose weights start the run (fine-tuning); ignored on resume
    normalisation: str = "continuum"  # SNID-style: flattened templates and calibrated spectra meet here
    seed: int = 0
    split_seed: int = 0
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
    resume: bool = True
    device: str = "auto"
    threads: int = 2

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

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        data.update(overrides)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"{path}: unknown training config keys {sorted(unknown)}")
        return cls(**data)


# ------------------------------------------------------------------------------------------------------------- data


def load_split(cfg: TrainConfig) -> tuple[list[Spectrum], list[Spectrum], list, dict]:
    """(train, validation, host galaxies, counts summary) exactly as training saw them; evaluation reuses it."""
    if cfg.spectra_pack:
        train_spectra, val_spectra, galaxies, summary = load_pack(cfg.spectra_pack)
        if cfg.max_spectra:
            raise ConfigError("max_spectra subsamples the manifest, not a spectra_pack")
        return train_spectra, val_spectra, galaxies, summary
    entries = read_manifest(cfg.manifest)
    spectra, dropped = load_spectra(entries)
    galaxies = load_galaxies(entries)
    if cfg.max_spectra:
        keep = np.random.default_rng(cfg.seed).permutation(len(spectra))[:cfg.max_spectra]
        spectra = [spectra[i] for i in sorted(keep)]
    split = split_by_object(spectra, val_fraction=cfg.val_fraction, seed=cfg.split_seed)
    train_spectra, val_spectra = list(split.train), list(split.val)
    if not train_spectra or not val_spectra:
        raise ConfigError(f"split left {len(train_spectra)} train and {len(val_spectra)} validation spectra")
    summary = {"train": counts_table(train_spectra), "val": counts_table(val_spectra), "dropped": dict(dropped),
               "n_train_spectra": len(train_spectra), "n_val_spectra": len(val_spectra),
               "n_val_objects": len(split.val_objects), "n_galaxy_templates": len(galaxies)}
    return train_spectra, val_spectra, galaxies, summary


class SimulatedSEDM(torch.utils.data.Dataset):
    """Item (epoch, i): spectrum i simulated at SEDM resolution with the rng seeded by (seed, epoch, i)."""

    def __init__(self, spectra: list[Spectrum], galaxies: list, preprocess: PreprocessConfig, seed: int) -> None:
        self.spectra, self.galaxies, self.preprocess, self.seed = spectra, galaxies, preprocess, seed
        self.targets = np.array([CLASSES.index(s.label) for s in spectra])

    def __len__(self) -> int:
        return len(self.spectra)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, float]:
        epoch, i = key
        rng = np.random.default_rng([self.seed, epoch, i])
        for k in range(len(self.spectra)):  # a spectrum that cannot be simulated yields the next one of its class
            j = (i + k) % len(self.spectra)
            if self.targets[j] != self.targets[i]:
                continue
            try:
                x, z = simulate_input(self.spectra[j], self.galaxies, rng, self.preprocess)
            except PreprocessError:
                continue
            return torch.from_numpy(x), int(self.targets[j]), float(z)
        raise PreprocessError(f"no spectrum of class {CLASSES[self.targets[i]]} can be simulated", field="flux")


def batch_keys(n: int, batch_size: int, seed: int, start_step: int, rank: int = 0,
               world: int = 1) -> Iterator[list[tuple[int, int]]]:
    """Endless batches of (epoch, index) keys: a seeded permutation per epoch, resumable at any step."""
    per_epoch = max(1, n // batch_size)
    step = start_step
    while True:
        epoch, k = divmod(step, per_epoch)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        idx = perm[k * batch_size:(k + 1) * batch_size]
        yield [(epoch, int(i)) for i in idx[rank::world]]
        step += 1


def simulate_set(spectra: list[Spectrum], galaxies: list, preprocess: PreprocessConfig, *, repeats: int,
                 seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fixed simulated set: (x [N*repeats, 2, n_bins] float32, y [N*repeats], z [N*repeats])."""
    xs, ys, zs = [], [], []
    for r in range(repeats):
        for i, s in enumerate(spectra):
            try:
                x, z = simulate_input(s, galaxies, np.random.default_rng([seed, r, i]), preprocess)
            except PreprocessError:
                continue  # cannot be put on SEDM pixels: not part of the set (the same ones every time)
            xs.append(x), ys.append(CLASSES.index(s.label)), zs.append(z)
    return np.stack(xs), np.array(ys), np.array(zs)


@torch.inference_mode()
def predict(model: SpectraNet, x: np.ndarray, device: torch.device, batch: int = 256,
            z: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Logits [N, C], z mean [N] and z sigma [N] of ``model`` (eval mode) over x [N, 2, n_bins].

    ``z`` [N] (two networks): the redshifts the classifier's rest-frame views use instead of the network's own
    (NaN: its own), to measure what redshift errors cost the classification."""
    model.eval()
    logits, zm, zs = [], [], []
    for k in range(0, len(x), batch):
        xb = torch.from_numpy(x[k:k + batch]).to(device)
        zb = None if z is None else torch.as_tensor(z[k:k + batch], dtype=torch.float32, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(xb, zb)
        logits.append(out.logits.float().cpu()), zm.append(out.z_mean.float().cpu())
        zs.append(torch.exp(0.5 * out.z_logvar.float()).cpu())
    return {"logits": torch.cat(logits).numpy(), "z": torch.cat(zm).clamp_min(0).numpy(),
            "z_err": torch.cat(zs).numpy()}


def val_metrics(pred: dict[str, np.ndarray], y: np.ndarray, z: np.ndarray, temperature: float = 1.0) -> dict:
    probs = M.softmax(pred["logits"], temperature)
    out = M.classification_report(y, probs, CLASSES)
    out["redshift"] = M.redshift_stats(pred["z"], z)
    out["ece"] = M.expected_calibration_error(probs, y)
    return out


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """Move the EMA weights towards the model's; buffers (BatchNorm statistics) are copied as they are."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The preset's architecture, with the config's pooling, norm and two networks where it names them.

    Two networks get a rest-frame grid half as long again as the input's (384 bins for 256), which keeps the whole
    observed range in view up to z ~ 0.69 with the input grid's own log step.
    """
    preset = PRESETS[cfg.preset]
    overrides: dict[str, Any] = {k: v for k, v in (("pooling", cfg.pooling), ("norm", cfg.norm)) if v}
    if cfg.two_networks:
        overrides.update(two_networks=True, rest_bins=preset.n_bins * 3 // 2,
                         log_step=math.log(_RANGE.wave_max / _RANGE.wave_min) / preset.n_bins)
    return replace(preset, **overrides)


def classifier_z(z: torch.Tensor, cfg: TrainConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """The redshift each training spectrum's rest-frame view uses: true z jittered by ``z_noise`` in ln(1 + z), or
    NaN (the model then uses its own estimate) for a ``pred_z_fraction`` share of the batch."""
    noise = torch.randn(z.shape, generator=generator).to(z.device) * cfg.z_noise
    jittered = ((1.0 + z) * torch.exp(noise) - 1.0).clamp(min=0.0) if cfg.z_noise > 0 else z
    own = (torch.rand(z.shape, generator=generator) < cfg.pred_z_fraction).to(z.device)
    return torch.where(own, torch.full_like(z, math.nan), jittered)


def schedule_step(step: int, elapsed_s: float, cfg: TrainConfig) -> int:
    """The step the LR schedule is at: with a wall-clock budget, the cosine ends when either steps or time run out.

    On a shared CPU the speed is unknown in advance; a cosine laid out over ``max_steps`` that the time limit cuts
    short would stop at a high learning rate. Warm-up always counts real steps.
    """
    if cfg.time_limit_min <= 0 or step < cfg.warmup_steps:
        return step
    return max(step, int(min(1.0, elapsed_s / (60.0 * cfg.time_limit_min)) * cfg.max_steps))


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


# ------------------------------------------------------------------------------------------------------------- train


def train(cfg: TrainConfig) -> Checkpoint:
    """Run the recipe; returns the exported checkpoint (``out_dir/<name>-<version>.{safetensors,json}``)."""
    t_start = time.time()
    # device and distributed setup
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("nccl")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    torch.set_num_threads(cfg.threads)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed input shapes: pick the fastest kernels once
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    main_proc = rank == 0

    # data: object-held-out split, SEDM simulation through the inference preprocessing
    model_cfg = model_config(cfg)
    preprocess = PreprocessConfig(grid=replace(_RANGE, n_bins=model_cfg.n_bins), normalisation=cfg.normalisation)
    train_spectra, val_spectra, galaxies, summary = load_split(cfg)
    if main_proc:
        print(json.dumps({k: v for k, v in summary.items() if k not in ("train", "val")}))
        for part in ("train", "val"):
            for cls, row in summary[part].items():
                print(f"{part:5s} {cls:7s} {row}")
    dataset = SimulatedSEDM(train_spectra, galaxies, preprocess, cfg.seed)
    x_val, y_val, z_val = simulate_set(val_spectra, galaxies, preprocess, repeats=cfg.val_repeats, seed=cfg.val_seed)

    # model, EMA, optimiser
    model = SpectraNet(model_cfg).to(device)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)  # no weight decay on biases and norms
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
    class_counts = np.bincount(dataset.targets, minlength=len(CLASSES))
    weights = class_balanced_weights(class_counts.tolist(), cfg.cb_beta).to(device)

    # fine-tune from a checkpoint, or resume
    step, best_f1, best_step, evals_since_best, history = 0, -1.0, -1, 0, []
    state_path = out_dir / "state.pt"
    resuming = cfg.resume and state_path.is_file()
    if cfg.init_from and not resuming:
        start = load_checkpoint(cfg.init_from)
        if start.model_config != model_cfg:
            raise ConfigError(f"init_from {cfg.init_from}: its architecture {start.model_config} is not this "
                              f"config's {model_cfg}")
        model.load_state_dict(start.build_model().state_dict()), ema.load_state_dict(model.state_dict())
        if main_proc:
            print(f"starting from the weights of {cfg.init_from} ({start.name} {start.version})")
    if resuming:
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"]), ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, best_f1, best_step = state["step"], state["best_f1"], state["best_step"]
        evals_since_best, history = state["evals_since_best"], state["history"]
        if main_proc:
            print(f"resumed from {state_path} at step {step} (best val macro-F1 {best_f1:.4f} at {best_step})")
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_keys(len(dataset), cfg.batch_size, cfg.seed, step, rank, world),
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
        worker_init_fn=lambda _: torch.set_num_threads(1))
    batches = iter(loader)
    z_gen = torch.Generator().manual_seed(cfg.seed + step)  # classifier_z's draws (reseeded on resume)

    # loop
    if main_proc:
        print(f"model {cfg.preset}: {count_parameters(model):,} parameters; {len(train_spectra)} train spectra, "
              f"{len(x_val)} simulated validation spectra; device {device}")
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not main_proc, dynamic_ncols=True)
    last_f1, stop, skipped = float("nan"), step >= cfg.max_steps, 0
    while not stop:
        lr = lr_at(schedule_step(step, time.time() - t_start, cfg), base_lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                   max_steps=cfg.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y, z = next(batches)                      # x: [B, 2, n_bins], y: [B], z: [B]
        x, y, z = x.to(device, non_blocking=True), y.to(device), z.to(device, torch.float32)
        train_model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = train_model(x, classifier_z(z, cfg, z_gen))  # two networks: the rest frame of z, jittered/own
        loss_cls = focal_loss(out.logits.float(), y, weights, cfg.focal_gamma)
        loss_z = gaussian_nll(out.z_mean.float(), out.z_logvar.float(), z)
        loss = loss_cls + cfg.z_weight * loss_z
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if torch.isfinite(loss) and torch.isfinite(grad_norm):
            optimizer.step()
            ema_update(ema, model, cfg.ema_decay)
        else:  # one non-finite batch must not poison the weights: skip it, and count it
            skipped += 1
        step += 1
        acc = (out.logits.argmax(1) == y).float().mean().item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", cls=f"{loss_cls.item():.3f}", z=f"{loss_z.item():.2f}",
                        acc=f"{acc:.2f}", lr=f"{lr:.1e}", val_f1=f"{last_f1:.3f}", skipped=skipped)

        # evaluate the EMA weights; checkpoint; early stopping
        out_of_time = cfg.time_limit_min > 0 and time.time() - t_start > 60 * cfg.time_limit_min
        if main_proc and (step % cfg.eval_every == 0 or step >= cfg.max_steps or out_of_time):
            m = val_metrics(predict(ema, x_val, device), y_val, z_val)
            last_f1 = m["macro_f1"]
            history.append({"step": step, "loss": loss.item(), "val_macro_f1": last_f1,
                            "val_accuracy": m["accuracy"], "val_ia": m["ia_vs_non_ia_accuracy"],
                            "val_z_rms": m["redshift"]["rms"], "skipped_steps": skipped,
                            "elapsed_s": round(time.time() - t_start, 1)})
            tqdm.write(json.dumps(history[-1]))
            if last_f1 > best_f1:
                best_f1, best_step, evals_since_best = last_f1, step, 0
                torch.save(ema.state_dict(), out_dir / "best_ema.pt")
            else:
                evals_since_best += 1
            torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                        "step": step, "best_f1": best_f1, "best_step": best_step,
                        "evals_since_best": evals_since_best, "history": history, "config": asdict(cfg)},
                       state_path)
            stop = evals_since_best >= cfg.patience or step >= cfg.max_steps or out_of_time
        stop = stop or step >= cfg.max_steps
        if world > 1:
            flag = torch.tensor([float(stop)], device=device)
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
    bar.close()

    # export: best EMA weights, temperature fitted on validation
    ckpt: Checkpoint | None = None
    if main_proc:
        ema.load_state_dict(torch.load(out_dir / "best_ema.pt", map_location=device))
        pred = predict(ema, x_val, device)
        temperature = M.fit_temperature(pred["logits"], y_val)
        before, after = val_metrics(pred, y_val, z_val), val_metrics(pred, y_val, z_val, temperature)
        train_s = time.time() - t_start
        extra = {
            "trained": True, "preset": cfg.preset, "taxonomy_version": TAXONOMY_VERSION,
            "parameters": count_parameters(ema), "train_config": asdict(cfg), "simulation": asdict(SEDM_DEFAULT),
            "data": summary, "best_step": best_step, "steps_run": step, "history": history,
            "validation": {**after, "ece_before_temperature": before["ece"], "ece_after_temperature": after["ece"],
                           "temperature": temperature,
                           "note": "simulated SEDM (R~100, 25.6 A pixels), object-held-out split, EMA weights"},
            "training_time_s": round(train_s, 1), "hardware": _hardware(device),
            "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
        }
        ckpt = save_checkpoint(ema, out_dir / f"{cfg.name}-{cfg.version}", name=cfg.name, version=cfg.version,
                               taxonomy=CLASSES, preprocess=preprocess, temperature=temperature, extra=extra)
        print(f"exported {out_dir}/{cfg.name}-{cfg.version}.safetensors: best step {best_step}, val macro-F1 "
              f"{after['macro_f1']:.4f}, T={temperature:.3f}, {train_s / 60:.1f} min")
    if world > 1:
        dist.destroy_process_group()
    return ckpt  # type: ignore[return-value]


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train SpectraNet on simulated SEDM spectra.")
    ap.add_argument("--config", required=True, type=Path)
    ap.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. --set max_steps=100")
    args = ap.parse_args(argv)
    train(TrainConfig.from_yaml(args.config, **parse_overrides(args.set)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
