"""Train SpectraNet on simulated SEDM spectra: ``spectranet train --config training/configs/default.yaml``.

The paper's recipe (arXiv:2510.07215), top to bottom: config (``loop.TrainConfig``) -> device -> data
(object-held-out split, on-the-fly SEDM simulation through the inference preprocessing) -> model -> AdamW with linear
warm-up and cosine decay ->
loop (class-balanced focal loss, gamma 2, beta 0.9999, plus the redshift head's Gaussian NLL; gradient clipping at
1.0; an EMA of the weights, decay 0.995, is what validation sees and what is exported; bf16 autocast on GPU only) ->
early stopping on validation macro-F1 -> temperature fitted on validation -> export a checkpoint that
``spectranet.streamer.science.checkpoint.load_checkpoint`` and ``spectranet.streamer.science.inference.InferenceEngine``
use as is.

The network reads observer-frame input (packets rarely carry a redshift): one multi-task network, or with
``two_networks`` (the shipped model, chosen by ``spectranet.training.ablation``) a redshift network whose classifier
sees the rest frame of the predicted z at validation and inference, and in training of the true z (jittered by
``z_noise``) or, for a ``pred_z_fraction`` share, of its own estimate. The validation set is
simulated once with a fixed seed, so every evaluation scores the same inputs; training samples are seeded by (seed,
epoch, index), so a resumed run draws exactly the samples the interrupted run would have.

Resume: ``out_dir/state.pt`` is written at every evaluation; a run whose ``out_dir`` holds one continues from it
(``resume: false`` starts over). With ``keep_snapshots`` the EMA weights of every evaluation are also kept
(``out_dir/snapshots/step-N.pt``), to average afterwards. Fine-tune: ``init_from`` starts a fresh run (new optimiser
and schedule) from a checkpoint's weights.

The parts this shares with the ablation (config, sample retry, batches, optimiser groups, the training step with
AMP, clipping and EMA, evaluation helpers) live in ``spectranet.training.loop``; this module is the recipe.

Multi-GPU (documented, not tested; single-process is what the tests run): launch with
``torchrun --standalone --nproc_per_node=N -m spectranet.training.train --config FILE``. With ``WORLD_SIZE > 1`` each
process joins the NCCL process group, wraps the model in ``DistributedDataParallel``, and takes every N-th index of each
global batch (so ``batch_size`` is the global batch); rank 0 alone evaluates, checkpoints and exports, and broadcasts
the early-stopping decision.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
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
from spectranet.training.loop import (
    SimulatedSet,
    TrainConfig,
    Trainee,
    batches,
    class_weights,
    learning_rate,
    out_of_time,
    parse_overrides,
    pick_device,
    predict,
    train_step,
    val_metrics,
)
from spectranet.training.simulate import (
    SEDM_DEFAULT,
    SimConfig,
    mix_spectra,
    redshift_pool,
    sedm_input_bins,
    simulate_input,
)
from tqdm import tqdm

_RANGE = PreprocessConfig().grid  # the model's wavelength range (streamer's default grid); bins follow the preset

# TrainConfig, parse_overrides and predict are defined in spectranet.training.loop and listed here because the CLI,
# evaluation and calibration import them from this module.
__all__ = ["TrainConfig", "train", "load_split", "simulate_set", "predict", "model_config", "classifier_z",
           "parse_overrides", "main"]


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
    split = split_by_object(spectra, val_fraction=cfg.val_fraction, seed=cfg.split_seed, names=cfg.object_names)
    train_spectra, val_spectra = list(split.train), list(split.val)
    if not train_spectra or not val_spectra:
        raise ConfigError(f"split left {len(train_spectra)} train and {len(val_spectra)} validation spectra")
    summary = {"train": counts_table(train_spectra), "val": counts_table(val_spectra), "dropped": dict(dropped),
               "n_train_spectra": len(train_spectra), "n_val_spectra": len(val_spectra),
               "n_val_objects": len(split.val_objects), "n_galaxy_templates": len(galaxies)}
    return train_spectra, val_spectra, galaxies, summary


class SimulatedSEDM(SimulatedSet):
    """Item (epoch, i): spectrum i simulated at SEDM resolution through the inference preprocessing, x [2, n_bins];
    for the small classes (``mix_classes``) a ``mix_prob`` share of draws blends it first with a spectrum of another
    object of its class, weight uniform in [0.2, 0.8]."""

    def __init__(self, spectra: list[Spectrum], galaxies: list, preprocess: PreprocessConfig, seed: int,
                 sim: SimConfig = SEDM_DEFAULT, *, mix_prob: float = 0.0, mix_classes: tuple[str, ...] = ()) -> None:
        super().__init__(spectra, galaxies, seed)
        self.preprocess, self.sim, self.mix_prob = preprocess, sim, mix_prob
        self.by_class = {c: [s for s in spectra if s.label == c] for c in mix_classes}

    def draw(self, spectrum: Spectrum, rng: np.random.Generator) -> tuple[torch.Tensor, float]:
        partners = self.by_class.get(spectrum.label, ())
        if partners and rng.random() < self.mix_prob:
            partner = partners[int(rng.integers(len(partners)))]
            if partner.object_id != spectrum.object_id:
                spectrum = mix_spectra(spectrum, partner, float(rng.uniform(0.2, 0.8)))
        x, z = simulate_input(spectrum, self.galaxies, rng, self.preprocess, self.sim)
        return torch.from_numpy(x), z


def mix_classes(cfg: TrainConfig, spectra: list[Spectrum]) -> tuple[str, ...]:
    """The classes whose draws are mixed: at most ``mix_max_objects`` training objects (none when ``mix_prob`` is 0)."""
    if cfg.mix_prob <= 0:
        return ()
    objects: dict[str, set[str]] = {}
    for s in spectra:
        objects.setdefault(s.label, set()).add(s.object_id)
    return tuple(c for c in CLASSES if 0 < len(objects.get(c, ())) <= cfg.mix_max_objects)


def training_simulation(cfg: TrainConfig, train_spectra: list[Spectrum]) -> SimConfig:
    """The SEDM simulation of training samples: the default, with ``z_pool_prob`` of the re-drawn redshifts taken
    from the real redshifts of the training spectra's classes, and ``keep_source_z`` (when >= 0) the chance an observed
    spectrum keeps its own redshift, as validation's real-degraded set always does (validation stays on the default)."""
    sim = SEDM_DEFAULT
    if cfg.z_pool_prob > 0:
        sim = replace(sim, z_pool_prob=cfg.z_pool_prob, z_pool=redshift_pool(train_spectra))
    if cfg.keep_source_z >= 0:
        sim = replace(sim, keep_source_z=cfg.keep_source_z)
    return sim


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
            xs.append(x)
            ys.append(CLASSES.index(s.label))
            zs.append(z)
    return np.stack(xs), np.array(ys), np.array(zs)


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The preset's architecture, with the config's pooling, norm and two networks where it names them, reading the
    input bins the SEDM simulation can cover (``input_bins``).

    Two networks get a rest-frame grid half as long again as the input's (384 bins for 256), which keeps the whole
    observed range in view up to z ~ 0.69 with the input grid's own log step.
    """
    preset = PRESETS[cfg.preset]
    overrides: dict[str, Any] = {k: v for k, v in (("pooling", cfg.pooling), ("norm", cfg.norm)) if v}
    overrides["input_bins"] = sedm_input_bins(replace(_RANGE, n_bins=preset.n_bins))
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
    device = pick_device(cfg)
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
    sim = training_simulation(cfg, train_spectra)
    dataset = SimulatedSEDM(train_spectra, galaxies, preprocess, cfg.seed, sim, mix_prob=cfg.mix_prob,
                            mix_classes=mix_classes(cfg, train_spectra))
    if main_proc and dataset.by_class:
        print(f"same-class mixing ({cfg.mix_prob:.0%} of draws): {', '.join(dataset.by_class)}")
    x_val, y_val, z_val = simulate_set(val_spectra, galaxies, preprocess, repeats=cfg.val_repeats, seed=cfg.val_seed)

    # model, EMA, optimiser
    t = Trainee.create(SpectraNet(model_cfg).to(device), cfg)
    model, ema = t.model, t.ema
    weights = class_weights(dataset, cfg, device)

    # fine-tune from a checkpoint, or resume
    step, best_f1, best_step, evals_since_best, history = 0, -1.0, -1, 0, []
    state_path = out_dir / "state.pt"
    resuming = cfg.resume and state_path.is_file()
    if cfg.init_from and not resuming:
        start = load_checkpoint(cfg.init_from)
        # test-time classifier views and the bins read are set at assembly (training/ensemble.py), not trained
        if replace(start.model_config, classifier_views=(), input_bins=()) != replace(model_cfg, input_bins=()):
            raise ConfigError(f"init_from {cfg.init_from}: its architecture {start.model_config} is not this "
                              f"config's {model_cfg}")
        model.load_state_dict(start.build_model().state_dict()), ema.load_state_dict(model.state_dict())
        if main_proc:
            print(f"starting from the weights of {cfg.init_from} ({start.name} {start.version})")
    if resuming:
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"]), ema.load_state_dict(state["ema"])
        t.optimizer.load_state_dict(state["optimizer"])
        step, best_f1, best_step = state["step"], state["best_f1"], state["best_step"]
        evals_since_best, history = state["evals_since_best"], state["history"]
        if main_proc:
            print(f"resumed from {state_path} at step {step} (best val macro-F1 {best_f1:.4f} at {best_step})")
    if world > 1:
        t.net = torch.nn.parallel.DistributedDataParallel(model)
    batch_iter = batches(dataset, cfg, device, start_step=step, rank=rank, world=world)
    z_gen = torch.Generator().manual_seed(cfg.seed + step)  # classifier_z's draws (reseeded on resume)

    # loop
    if main_proc:
        print(f"model {cfg.preset}: {count_parameters(model):,} parameters; {len(train_spectra)} train spectra, "
              f"{len(x_val)} simulated validation spectra; device {device}")
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not main_proc, dynamic_ncols=True)
    last_f1, stop, skipped = float("nan"), step >= cfg.max_steps, 0
    while not stop:
        lr = learning_rate(step, time.time() - t_start, cfg)
        x, y, z = next(batch_iter)                   # x: [B, 2, n_bins], y: [B], z: [B]
        x, y, z = x.to(device, non_blocking=True), y.to(device), z.to(device, torch.float32)
        # two networks: the classifier's rest-frame view uses z jittered, or (NaN) the network's own estimate
        losses = train_step(t, x, y, z, lr=lr, weights=weights, cfg=cfg, z_in=classifier_z(z, cfg, z_gen))
        skipped += not losses.applied  # one non-finite batch must not poison the weights: skipped, and counted
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses.loss:.3f}", cls=f"{losses.classification:.3f}", z=f"{losses.redshift:.2f}",
                        acc=f"{losses.accuracy:.2f}", lr=f"{lr:.1e}", val_f1=f"{last_f1:.3f}", skipped=skipped)

        # evaluate the EMA weights; checkpoint; early stopping
        no_time_left = out_of_time(time.time() - t_start, cfg)
        if main_proc and (step % cfg.eval_every == 0 or step >= cfg.max_steps or no_time_left):
            m = val_metrics(predict(ema, x_val, device), y_val, z_val)
            last_f1 = m["macro_f1"]
            history.append({"step": step, "loss": losses.loss, "val_macro_f1": last_f1,
                            "val_accuracy": m["accuracy"], "val_ia": m["ia_vs_non_ia_accuracy"],
                            "val_z_rms": m["redshift"]["rms"], "skipped_steps": skipped,
                            "elapsed_s": round(time.time() - t_start, 1)})
            tqdm.write(json.dumps(history[-1]))
            if cfg.keep_snapshots:
                (out_dir / "snapshots").mkdir(exist_ok=True)
                torch.save(ema.state_dict(), out_dir / "snapshots" / f"step-{step:06d}.pt")
            if last_f1 > best_f1:
                best_f1, best_step, evals_since_best = last_f1, step, 0
                torch.save(ema.state_dict(), out_dir / "best_ema.pt")
            else:
                evals_since_best += 1
            torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": t.optimizer.state_dict(),
                        "step": step, "best_f1": best_f1, "best_step": best_step,
                        "evals_since_best": evals_since_best, "history": history, "config": asdict(cfg)},
                       state_path)
            stop = evals_since_best >= cfg.patience or step >= cfg.max_steps or no_time_left
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
            "parameters": count_parameters(ema), "train_config": asdict(cfg),
            "simulation": {**asdict(sim), "z_pool": {label: len(zs) for label, zs in sim.z_pool}},  # counts
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train SpectraNet on simulated SEDM spectra.")
    ap.add_argument("--config", required=True, type=Path)
    ap.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. --set max_steps=100")
    args = ap.parse_args(argv)
    train(TrainConfig.from_yaml(args.config, **parse_overrides(args.set)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
