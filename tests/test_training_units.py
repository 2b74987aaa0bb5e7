"""Training package, pure parts: losses, schedule, metrics, split, readers of the template formats, the loop's parts."""

from __future__ import annotations

import math
from dataclasses import replace
from itertools import islice
from typing import Any

import numpy as np
import pytest
import torch
from spectranet.streamer.contract.readers import flux_err_as_sigma
from spectranet.streamer.errors import ConfigError, PreprocessError
from spectranet.streamer.science.model import PRESETS, ModelConfig, SpectraNet
from spectranet.streamer.science.taxonomy import CLASSES
from spectranet.training import metrics as M
from spectranet.training.data import Spectrum, canonical_object, load_pack, read_lnw, save_pack, split_by_object
from spectranet.training.loop import (
    SimulatedSet,
    TrainConfig,
    Trainee,
    batch_keys,
    ema_update,
    learning_rate,
    parse_overrides,
    sampling_weights,
    schedule_step,
    train_step,
)
from spectranet.training.losses import class_balanced_weights, focal_loss, gaussian_nll, lr_at
from spectranet.training.simulate import first_usable
from spectranet.training.train import classifier_z, model_config

# ------------------------------------------------------------------------------------------------------------ losses

def test_focal_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    target = torch.tensor([0, 2])
    p = torch.softmax(logits, dim=1)
    p0, p1 = p[0, 0].item(), p[1, 2].item()
    by_hand = (-(1 - p0) ** 2 * math.log(p0) - (1 - p1) ** 2 * math.log(p1)) / 2
    assert focal_loss(logits, target, gamma=2.0).item() == pytest.approx(by_hand, rel=1e-6)
    w = torch.tensor([1.0, 1.0, 3.0])
    weighted = (-(1 - p0) ** 2 * math.log(p0) - 3 * (1 - p1) ** 2 * math.log(p1)) / 2
    assert focal_loss(logits, target, w, gamma=2.0).item() == pytest.approx(weighted, rel=1e-6)
    # gamma 0 is cross-entropy
    ce = torch.nn.functional.cross_entropy(logits, target).item()
    assert focal_loss(logits, target, gamma=0.0).item() == pytest.approx(ce, rel=1e-6)


def test_class_balanced_weights_follow_effective_numbers():
    beta = 0.9999
    w = class_balanced_weights([1000, 10, 0], beta)
    eff = [(1 - beta**n) / (1 - beta) for n in (1000, 10)]
    assert w[2].item() == 0.0
    assert (w[1] / w[0]).item() == pytest.approx(eff[0] / eff[1], rel=1e-5)
    assert w.sum().item() == pytest.approx(3.0, rel=1e-5)


def test_gaussian_nll_and_schedule():
    mean, logvar, z = torch.tensor([0.1]), torch.tensor([math.log(0.04)]), torch.tensor([0.3])
    plain = 0.5 * (math.log(0.04) + 0.04 / 0.04)
    assert gaussian_nll(mean, logvar, z, beta=0.0).item() == pytest.approx(plain, rel=1e-6)
    assert gaussian_nll(mean, logvar, z).item() == pytest.approx(0.2 * plain, rel=1e-6)  # beta-NLL: x sigma
    lrs = [lr_at(s, base_lr=1.0, warmup_steps=10, max_steps=110) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[110] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


# ----------------------------------------------------------------------------------------------------------- metrics

def test_confusion_prf_macro_f1_hand_case():
    y = np.array([0, 0, 1, 1, 2])
    p = np.array([0, 1, 1, 1, 0])
    cm = M.confusion_matrix(y, p, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    precision, recall, f1, support = M.per_class_prf(cm)
    assert precision[:3].tolist() == pytest.approx([0.5, 2 / 3, 0.0])
    assert recall[:3].tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert f1[1] == pytest.approx(0.8)
    # class 3 is absent from the truth: not scored
    assert M.macro_f1(cm) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_group_accuracies():
    ia = CLASSES.index("Ia")
    assert M.ia_accuracy(np.array([ia, ia, 1, 2]), np.array([ia, 3, 1, ia]), ia) == pytest.approx(0.5)
    y = np.array([CLASSES.index("II"), CLASSES.index("Ic"), CLASSES.index("Ia")])
    probs = np.zeros((3, len(CLASSES)))
    probs[0, CLASSES.index("IIb")] = 0.6  # H-rich
    probs[0, CLASSES.index("Ib")] = 0.4
    probs[1, CLASSES.index("IIn")] = 0.5  # wrong group
    probs[1, CLASSES.index("Ib")] = 0.3
    probs[2, CLASSES.index("Ia")] = 1.0   # not scored in this decision
    acc, n = M.h_rich_poor_accuracy(y, probs, CLASSES)
    assert (acc, n) == (pytest.approx(0.5), 2)


def test_decisions_of_one_reported_class_per_spectrum():
    i = {c: CLASSES.index(c) for c in CLASSES}
    y = np.array([i["II"], i["Ic"], i["Ib"], i["Ia"], i["IIb"]])
    pred = np.array([i["IIn"], i["Ia"], i["Ic-BL"], i["Ia"], i["Ib"]])
    # H-rich vs H-poor over the four CC spectra: II->IIn right, Ic->Ia wrong (outside both groups), Ib->Ic-BL right,
    # IIb->Ib wrong
    assert M.h_rich_poor_decision_accuracy(y, pred, CLASSES) == pytest.approx(0.5)
    d = M.decision_report(y, pred, CLASSES)
    assert d["accuracy"] == pytest.approx(0.2) and d["ia_vs_non_ia_accuracy"] == pytest.approx(0.8)
    assert d["h_rich_vs_h_poor_accuracy"] == pytest.approx(0.5)
    assert d["macro_f1"] == pytest.approx(M.macro_f1(M.confusion_matrix(y, pred, len(CLASSES))))
    assert np.isnan(M.h_rich_poor_decision_accuracy(np.array([i["Ia"]]), np.array([i["Ia"]]), CLASSES))


def test_redshift_stats_hand_case():
    zt = np.array([0.0, 0.1, 0.2, 0.5])
    zp = np.array([0.0, 0.1 + 0.011, 0.2 - 0.012, 0.5 + 0.3])
    s = M.redshift_stats(zp, zt)
    dz = (zp - zt) / (1 + zt)
    assert s["rms"] == pytest.approx(float(np.sqrt(np.mean(dz**2))))
    assert s["outlier_fraction"] == pytest.approx(0.25)
    assert s["nmad"] == pytest.approx(1.4826 * np.median(np.abs(dz - np.median(dz))))


def test_ece_and_temperature():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    y = np.array([0, 1, 0, 0])
    # bins: 0.9 (acc 0.5), 0.6 (acc 1.0) -> ECE = 0.5 * 0.4 + 0.5 * 0.4
    assert M.expected_calibration_error(probs, y, n_bins=10) == pytest.approx(0.4)
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, (4000, 4))
    y = np.array([rng.choice(4, p=p) for p in M.softmax(true_logits)])
    t = M.fit_temperature(true_logits * 3.0, y)  # over-confident by 3x
    assert t == pytest.approx(3.0, rel=0.1)


def test_temperature_and_bias_recover_a_known_miscalibration():
    # labels drawn from softmax(true logits); the model's logits are 2x over-confident and shifted against class 0
    # (what a class-balanced loss does to a frequent class): the fit must undo both
    rng = np.random.default_rng(1)
    true_logits = rng.normal(0, 1.5, (6000, 4)) + np.array([1.0, 0.0, 0.0, -0.5])
    y = np.array([rng.choice(4, p=p) for p in M.softmax(true_logits)])
    shift = np.array([-1.2, 0.4, 0.4, 0.4])
    t, b = M.fit_temperature_and_bias(2.0 * true_logits + shift, y, 4, l2=0.0)
    assert t == pytest.approx(2.0, rel=0.1)
    np.testing.assert_allclose(b - b.mean(), -(shift - shift.mean()) / t, atol=0.1)
    # regularised, the bias is smaller but points the same way
    _, b_l2 = M.fit_temperature_and_bias(2.0 * true_logits + shift, y, 4, l2=0.5)
    assert np.linalg.norm(b_l2) < np.linalg.norm(b) and b_l2[0] > b_l2[1:].max()


def test_precision_recall_curve():
    precision, recall, ap = M.precision_recall_curve(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0]))
    assert precision.tolist() == pytest.approx([1.0, 0.5, 2 / 3, 0.5])
    assert recall.tolist() == pytest.approx([0.5, 0.5, 1.0, 1.0])
    assert ap == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)


# -------------------------------------------------------------------------------------------------------- data/split

def _spec(obj: str, label: str) -> Spectrum:
    w = np.linspace(3000, 9000, 100)
    return Spectrum(wave=w, flux=np.ones_like(w), label=label, object_id=obj, source="t", redshift=0.0, phase=None,
                    path=f"{obj}.txt")


def test_split_is_object_disjoint_stratified_and_seeded():
    spectra = [_spec(f"{cls}-{i}", cls) for cls, n in (("Ia", 40), ("II", 10), ("TDE", 3)) for i in range(n)
               for _ in range(3)]  # three spectra per object
    split = split_by_object(spectra, val_fraction=0.2, seed=7)
    train_objs = {s.object_id for s in split.train}
    val_objs = {s.object_id for s in split.val}
    assert not train_objs & val_objs
    assert len(split.train) + len(split.val) == len(spectra)
    per_class = {c: len({s.object_id for s in split.val if s.label == c}) for c in ("Ia", "II", "TDE")}
    assert per_class == {"Ia": 8, "II": 2, "TDE": 1}  # 20% rounded, at least one
    again = split_by_object(spectra, val_fraction=0.2, seed=7)
    assert again.val_objects == split.val_objects
    assert split_by_object(spectra, val_fraction=0.2, seed=8).val_objects != split.val_objects


def test_canonical_object_names_meet_across_sources():
    assert canonical_object("SN 2011fe") == canonical_object("sn2011fe") == canonical_object("2011fe")
    assert canonical_object("PTF10bzf") == "ptf10bzf"


def test_variance_column_is_square_rooted():
    flux = np.full(10, 2e-15)
    assert flux_err_as_sigma(flux, np.full(10, 4e-32)) == pytest.approx(np.full(10, 2e-16))
    assert flux_err_as_sigma(flux, np.full(10, 1e-16)) == pytest.approx(np.full(10, 1e-16))


def test_read_lnw(tmp_path):
    rows = "\n".join(f"{3000 + 10 * i:8.2f} {0.0 if i < 3 else 0.1:8.3f} {0.2:8.3f}" for i in range(6))
    text = ("    2    6   3000.00  3050.00      2     SN1999x   -9.99  Ia-norm   1  1\n"
            "  2  2  0.1  2  0.1\n  1 3.1 0.0 3.1 0.0\n  2 3.2 0.0 3.2 0.0\n"
            "     0   -5.0   10.0\n" + rows + "\n")
    path = tmp_path / "t.lnw"
    path.write_text(text)
    wave, flux, phases, sn_type = read_lnw(path)
    assert wave.shape == (6,) and flux.shape == (2, 6)
    assert phases.tolist() == [-5.0, 10.0] and sn_type == "Ia-norm"
    assert flux[0, :3].tolist() == [0, 0, 0] and flux[1, 0] == pytest.approx(0.2)


# ------------------------------------------------------------------------------------------------ config and helpers


def test_overrides_parse_yaml_values_and_reject_junk():
    assert parse_overrides(["lr=3e-4", "pooling=multiscale", "spectra_pack=", "resume=false", "max_steps=7"]) == {
        "lr": 3e-4, "pooling": "multiscale", "spectra_pack": "", "resume": False, "max_steps": 7}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])
    with pytest.raises(ConfigError, match="unknown"):
        parse_overrides(["learning_rate=1"])
    with pytest.raises(ConfigError, match="max_steps"):
        parse_overrides(["max_steps=many"])


def test_pooling_and_norm_override_the_preset():
    # new models read the input bins the SEDM simulation covers (training.simulate.sedm_input_bins)
    assert model_config(TrainConfig()) == replace(PRESETS["default"], input_bins=(16, 240))
    cfg = model_config(TrainConfig(pooling="multiscale", norm="batch"))
    assert (cfg.pooling, cfg.norm, cfg.widths) == ("multiscale", "batch", PRESETS["default"].widths)
    bad_choices: list[dict[str, Any]] = [{"pooling": "avg"}, {"norm": "group"}]
    for bad in bad_choices:
        with pytest.raises(ConfigError):
            TrainConfig(**bad)


def test_classifier_z_jitters_in_ln_one_plus_z_and_hands_a_share_to_the_network():
    z = torch.rand(20000) * 0.3
    assert torch.equal(classifier_z(z, TrainConfig()), z)  # the defaults: the exact redshift
    g = torch.Generator().manual_seed(0)
    out = classifier_z(z, TrainConfig(z_noise=0.02, pred_z_fraction=0.25), g)
    own = torch.isnan(out)
    assert abs(own.float().mean().item() - 0.25) < 0.02
    d = torch.log1p(out[~own]) - torch.log1p(z[~own])
    assert abs(d.std().item() - 0.02) < 0.002 and abs(d.mean().item()) < 0.002
    assert (out[~own] >= 0).all()
    assert torch.isnan(classifier_z(z, TrainConfig(pred_z_fraction=1.0))).all()
    bad_choices: list[dict[str, Any]] = [{"pred_z_fraction": 1.5}, {"z_noise": -0.1}]
    for bad in bad_choices:
        with pytest.raises(ConfigError):
            TrainConfig(**bad)


def test_ema_moves_weights_and_copies_batchnorm_statistics():
    torch.manual_seed(0)
    config = PRESETS["default"].__class__(**{**PRESETS["default"].__dict__, "norm": "batch"})
    model, ema = SpectraNet(config), SpectraNet(config)
    model.train()(torch.randn(4, 2, config.n_bins))  # updates the BatchNorm running statistics
    before = [p.detach().clone() for p in ema.parameters()]
    ema_update(ema, model, 0.9)
    for b, p_ema, p in zip(before, ema.parameters(), model.parameters()):
        torch.testing.assert_close(p_ema, 0.9 * b + 0.1 * p.detach())
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        assert torch.equal(b_ema, b)


def test_pack_clips_float16_overflow(tmp_path):
    wave = np.linspace(3000.0, 9000.0, 50)
    flux = np.ones(50)
    flux[10] = 1e22  # a junk spike, as in a few OSC files
    s = Spectrum(wave=wave, flux=flux, label="Ia", object_id="x", source="osc", redshift=0.01, phase=None, path="x")
    save_pack(tmp_path / "p.npz", train=[s], val=[s], galaxies=[(wave, np.ones(50))], summary={"n": 1})
    train, val, galaxies, summary = load_pack(tmp_path / "p.npz")
    assert np.isfinite(train[0].flux).all() and train[0].flux[10] == pytest.approx(65000.0, rel=1e-3)
    assert train[0].flux[0] == 1.0 and summary == {"n": 1} and len(galaxies) == 1


def test_config_from_a_checkpoint_card_keeps_what_it_knows_and_takes_overrides():
    card = {"train_config": {"val_fraction": 0.3, "split_seed": 4, "manifest": "elsewhere.csv", "retired_key": 1}}
    cfg = TrainConfig.from_checkpoint(card, manifest="here.csv")
    assert (cfg.val_fraction, cfg.split_seed, cfg.manifest) == (0.3, 4, "here.csv")
    assert TrainConfig.from_checkpoint({}) == TrainConfig()


def test_shipped_training_configs_load_and_chain():
    """Every config in training/configs is a valid TrainConfig; finetune.yaml starts from what default.yaml writes."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "training" / "configs"
    configs = {p.stem: TrainConfig.from_yaml(p) for p in sorted(root.glob("*.yaml"))}
    assert {"default", "finetune", "smoke", "gpu"} <= set(configs)
    first, second = configs["default"], configs["finetune"]
    assert second.init_from == f"{first.out_dir}/{first.name}-{first.version}"
    assert model_config(second) == model_config(first) and second.split_seed == first.split_seed
    assert second.val_fraction == first.val_fraction and second.out_dir != first.out_dir
    assert second.pred_z_fraction > 0 and second.z_noise > 0


# -------------------------------------------------------------------------------------------------------------- loop


class _Picky(SimulatedSet):
    """One draw is (object id, one number from the rng); objects named bad* cannot be drawn."""

    def draw(self, spectrum, rng):
        if spectrum.object_id.startswith("bad"):
            raise PreprocessError("cannot be simulated", field="flux")
        return (spectrum.object_id, float(rng.random())), 0.1


def test_sample_retry_takes_the_next_spectrum_of_the_same_class_and_is_seeded():
    labels = {"bad0": "Ia", "ok1": "II", "bad2": "Ia", "bad3": "II", "ok4": "Ia", "bad5": "TDE"}
    ds = _Picky([_spec(obj, label) for obj, label in labels.items()], [], seed=3)
    (name, r), cls, z = ds[(0, 0)]  # bad0 -> ok1 is II -> bad2 -> bad3 is II -> ok4
    assert (name, cls, z) == ("ok4", CLASSES.index("Ia"), 0.1)
    assert ds[(0, 3)][0][0] == "ok1" and ds[(0, 3)][1] == CLASSES.index("II")  # wraps round, skips ok4 and bad0
    assert ds[(0, 0)] == ds[(0, 0)] and ds[(1, 0)][0][1] != r  # the rng is seeded by (seed, epoch, index)
    with pytest.raises(PreprocessError, match="TDE"):
        ds[(0, 5)]


def test_batch_keys_resume_at_any_step_and_ranks_share_a_global_batch():
    straight = list(islice(batch_keys(10, 4, seed=1, start_step=0), 6))
    assert list(islice(batch_keys(10, 4, seed=1, start_step=4), 2)) == straight[4:]
    assert all(len(b) == 4 for b in straight) and straight[0][0][0] == 0 and straight[2][0][0] == 1  # 2 per epoch
    for step in range(3):
        ranks = [next(islice(batch_keys(10, 4, 1, step, rank=r, world=2), 1)) for r in range(2)]
        assert sorted(ranks[0] + ranks[1]) == sorted(straight[step])


def test_sampling_weights_balance_objects_within_each_class_and_keep_the_class_mix():
    # class 0: object a with 3 spectra, b with 1; class 1: c with 2, d with 2
    objects, targets = ["a", "a", "a", "b", "c", "c", "d", "d"], np.array([0, 0, 0, 0, 1, 1, 1, 1])
    assert sampling_weights(objects, targets, 0.0) is None
    full = sampling_weights(objects, targets, 1.0)
    assert full is not None and full.sum() == pytest.approx(1.0)
    assert full[targets == 0].sum() == pytest.approx(0.5)                  # the class mix is the spectra's
    assert full[:3].sum() == pytest.approx(full[3])                          # power 1: objects a and b alike
    assert np.allclose(full[4:], 1 / 8)                                      # equal objects: nothing changes
    half = sampling_weights(objects, targets, 0.5)
    assert half is not None and full[3] > half[3] > 1 / 8                    # in between
    with pytest.raises(ConfigError, match="object_balance"):
        TrainConfig(object_balance=1.5)


def test_weighted_batch_keys_follow_the_weights_and_resume():
    p = np.array([0.0, 0.0, 0.5, 0.5])
    keys = list(islice(batch_keys(4, 2, seed=3, start_step=0, p=p), 40))
    drawn = [i for b in keys for _, i in b]
    assert set(drawn) == {2, 3} and 30 < drawn.count(2) < 50                 # never the weightless ones
    assert list(islice(batch_keys(4, 2, seed=3, start_step=7, p=p), 3)) == keys[7:10]


def test_learning_rate_follows_the_schedule_and_the_time_budget():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110)
    assert learning_rate(60, 1e9, cfg) == lr_at(60, base_lr=1.0, warmup_steps=10, max_steps=110)
    timed = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, time_limit_min=1.0)
    assert schedule_step(20, 30.0, timed) == 55  # half the time gone: half-way down the cosine
    assert learning_rate(20, 60.0, timed) == pytest.approx(0.01)  # out of time: at the floor


def _tiny_net(seed: int = 0) -> SpectraNet:
    torch.manual_seed(seed)
    return SpectraNet(ModelConfig(n_bins=64, widths=(4, 8), kernels=((5, 3, 1), (3, 1, 1)), hidden=16))


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 2, 64, generator=g), torch.randint(0, len(CLASSES), (n,), generator=g),
            torch.rand(n, generator=g) * 0.2)


def test_trainee_decays_only_matrices_and_freezes_its_ema():
    t = Trainee.create(_tiny_net(), TrainConfig(weight_decay=0.05, lr=3e-3))
    decay, no_decay = t.optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and all(p.ndim >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(t.model.parameters()))
    assert not any(p.requires_grad for p in t.ema.parameters()) and not t.ema.training
    assert t.net is t.model


def test_train_step_updates_weights_and_ema_and_skips_a_non_finite_batch():
    cfg = TrainConfig(ema_decay=0.5, z_weight=0.7)
    t = Trainee.create(_tiny_net(), cfg)
    weights = torch.ones(len(CLASSES))
    before = [p.detach().clone() for p in t.model.parameters()]  # the EMA starts as a copy of these
    x, y, z = _batch()
    out = train_step(t, x, y, z, lr=1e-2, weights=weights, cfg=cfg)
    assert out.applied and out.loss == pytest.approx(out.classification + 0.7 * out.redshift, rel=1e-5)
    assert all(g["lr"] == 1e-2 for g in t.optimizer.param_groups)
    after = [p.detach().clone() for p in t.model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    for b, a, e in zip(before, after, t.ema.parameters()):
        torch.testing.assert_close(e, 0.5 * b + 0.5 * a)
    x_bad = x.clone()
    x_bad[0, 0, 0] = math.inf  # a non-finite loss: the step is skipped, nothing moves
    bad = train_step(t, x_bad, y, z, lr=1e-2, weights=weights, cfg=cfg)
    assert not bad.applied
    assert all(torch.equal(a, p) for a, p in zip(after, t.model.parameters()))


def test_a_network_takes_only_its_own_losses():
    cfg = TrainConfig(z_weight=2.0)
    x, y, z = _batch()
    z_only = train_step(Trainee.create(_tiny_net(), cfg, classify=False), x, y, z, lr=1e-3,
                        weights=torch.ones(len(CLASSES)), cfg=cfg)
    assert z_only.classification == 0.0 and z_only.redshift != 0.0
    assert z_only.loss == pytest.approx(2.0 * z_only.redshift, rel=1e-6)
    cls_only = train_step(Trainee.create(_tiny_net(), cfg, redshift=False), x, y, z, lr=1e-3,
                          weights=torch.ones(len(CLASSES)), cfg=cfg)
    assert cls_only.redshift == 0.0 and cls_only.loss == cls_only.classification > 0.0


def test_dropout_seed_gives_equal_networks_equal_steps_and_leaves_the_global_rng_alone():
    cfg = TrainConfig()
    x, y, z = _batch()
    w = torch.ones(len(CLASSES))
    a, b, c = (Trainee.create(_tiny_net(), cfg) for _ in range(3))
    state = torch.random.get_rng_state()
    first = train_step(a, x, y, z, lr=1e-2, weights=w, cfg=cfg, dropout_seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert train_step(b, x, y, z, lr=1e-2, weights=w, cfg=cfg, dropout_seed=7) == first
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert train_step(c, x, y, z, lr=1e-2, weights=w, cfg=cfg, dropout_seed=8).loss != first.loss  # other masks


def test_bf16_cpu_runs_the_cpu_step_in_bf16_and_keeps_the_weights_float32():
    x, y, z = _batch()
    w = torch.ones(len(CLASSES))
    steps = {}
    for bf16 in (False, True):
        cfg = TrainConfig(bf16_cpu=bf16)
        t = Trainee.create(_tiny_net(), cfg)
        seen: list[torch.dtype] = []
        hook = t.model.register_forward_hook(lambda _m, _i, out, seen=seen: seen.append(out.logits.dtype))
        steps[bf16] = train_step(t, x, y, z, lr=1e-2, weights=w, cfg=cfg, dropout_seed=3)
        hook.remove()
        assert seen == [torch.bfloat16 if bf16 else torch.float32]
        assert steps[bf16].applied and all(p.dtype == torch.float32 for p in t.model.parameters())
    assert steps[True].loss == pytest.approx(steps[False].loss, rel=0.05) and steps[True].loss != steps[False].loss


def test_first_usable_draws_again_until_the_user_accepts():
    spec = _spec("t", "Ia")
    seen = []

    def picky(sim):
        seen.append(sim.z)
        if len(seen) < 3:
            raise PreprocessError("not this one", field="flux")
        return sim.z

    assert first_usable(spec, [], np.random.default_rng(0), picky, tries=5) == seen[-1] and len(seen) == 3
    assert len(set(seen)) == 3  # every try is a new draw

    def never(sim):
        raise PreprocessError("never", field="flux")

    with pytest.raises(PreprocessError, match="none of 2"):
        first_usable(spec, [], np.random.default_rng(0), never, tries=2)


def _named_spec(obj: str, label: str = "Ia", source: str = "osc") -> Spectrum:
    """A spectrum of the object named ``obj`` as a catalogue spells it (canonical_object applied)."""
    return Spectrum(wave=np.linspace(3000, 9000, 10), flux=np.ones(10), label=label, object_id=canonical_object(obj),
                    source=source, redshift=0.01, phase=None, path=obj)


def test_v2_names_keep_a_snid_template_and_its_object_on_one_side_and_v1_can_split_them() -> None:
    from spectranet.training.data import drop_leaked, object_key

    assert object_key("sn02cs_bsnip") == object_key("SN 2002cs") == object_key("sn2002cs") == "2002cs"
    assert object_key("sn94D") == "1994d" and object_key("PTF10qts") == "ptf10qts"
    spectra = ([_named_spec(f"SN 20{i:02d}ab") for i in range(40)]
               + [_named_spec(f"sn{i:02d}ab", source="snid-lnw") for i in range(40)])
    v2 = split_by_object(spectra, val_fraction=0.3, seed=1, names="v2")
    assert {object_key(s.object_id) for s in v2.train}.isdisjoint({object_key(s.object_id) for s in v2.val})
    v1 = split_by_object(spectra, val_fraction=0.3, seed=1, names="v1")
    leaked = {object_key(s.object_id) for s in v1.train} & {object_key(s.object_id) for s in v1.val}
    assert leaked  # the old rule puts template and spectra of one object on both sides
    kept, dropped = drop_leaked(v1.train, v1.val)
    assert dropped > 0 and not {object_key(s.object_id) for s in kept} & {object_key(s.object_id) for s in v1.train}


def test_real_sedm_objects_are_always_validation_objects() -> None:
    spectra = [_named_spec(f"SN 2016{c}") for c in "abcdefghij"] + [_named_spec("SN 2016k", source="sedm")]
    for seed in range(5):
        assert "2016k" in split_by_object(spectra, val_fraction=0.1, seed=seed).val_objects


def test_a_checkpoint_trained_before_object_key_rebuilds_its_v1_split() -> None:
    from spectranet.training.loop import TrainConfig

    assert TrainConfig.from_checkpoint({"train_config": {"seed": 3}}).object_names == "v1"
    assert TrainConfig.from_checkpoint({"train_config": {"seed": 3, "object_names": "v2"}}).object_names == "v2"
    assert TrainConfig().object_names == "v2"


def test_the_stacker_learns_evidence_the_network_lacks_and_is_cross_fitted() -> None:
    from spectranet.training.calibrate import EvalSet
    from spectranet.training.evaluate import _stacked

    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, len(CLASSES), n)
    logits = rng.normal(size=(n, len(CLASSES)))                 # an uninformative network
    evidence = np.eye(len(CLASSES))[y] * rng.uniform(0.5, 1, n)[:, None]  # a matcher that is always right
    s = EvalSet(x=np.zeros((n, 2, 4), np.float32), y=y, z=np.zeros(n), objects=np.array([f"o{i}" for i in range(n)]),
                sources=np.array(["osc"] * n))
    probs = _stacked(s, logits, evidence)
    assert probs.shape == (n, len(CLASSES)) and np.allclose(probs.sum(axis=1), 1.0)
    assert (probs.argmax(axis=1) == y).mean() > 0.95
    assert (_stacked(s, logits, np.zeros_like(evidence)).argmax(axis=1) == y).mean() < 0.3  # nothing to learn


def test_fit_head_learns_from_its_features_and_its_pull_holds_the_trained_weights():
    from spectranet.training.refit_head import fit_head

    rng = np.random.default_rng(0)
    n_classes, hidden = 4, 8
    centres = rng.normal(0.0, 2.0, (n_classes, hidden))
    y = np.concatenate([np.zeros(200, int), np.ones(200, int), np.full(20, 2)])  # class 3 absent, class 2 rare
    features = (centres[y] + rng.normal(0.0, 1.0, (len(y), hidden))).astype(np.float32)
    w0 = rng.normal(0.0, 0.1, (n_classes, hidden)).astype(np.float32)
    b0 = np.zeros(n_classes, np.float32)
    accuracy = lambda w, b: float(((features @ w.T + b).argmax(1) == y).mean())  # noqa: E731
    assert accuracy(w0, b0) < 0.7
    w, b = fit_head(features, y, w0, b0, class_weight_power=0.0, l2=1e-3)
    assert accuracy(w, b) > 0.95 and w.dtype == np.float32 and w.shape == w0.shape
    held_w, held_b = fit_head(features, y, w0, b0, class_weight_power=0.0, l2=1e4)
    np.testing.assert_allclose(held_w, w0, atol=1e-3)  # the pull holds the weights; the bias is free ...
    assert abs(held_b[3] - b0[3]) < 1e-3 < np.abs(held_b[:3] - b0[:3]).min()  # ... but for the absent class
    assert np.abs(w[3] - w0[3]).max() < np.abs(w[:3] - w0[:3]).max()
    # class weights: the rare class is called more often when weighted
    recall = lambda w, b: float(((features @ w.T + b).argmax(1)[y == 2] == 2).mean())  # noqa: E731
    plain = fit_head(features, y, w0, b0, class_weight_power=0.0, l2=1.0)
    balanced = fit_head(features, y, w0, b0, class_weight_power=1.0, l2=1.0)
    assert recall(*balanced) > recall(*plain)


# ------------------------------------------------------------------------------- out-of-distribution cross-fitting

def _ood_data(rng: np.random.Generator) -> tuple[Any, Any, np.ndarray]:
    """Transients are noise; each real non-transient object has its own absorption band (one object per band), so
    only a score that has seen an object's band flags it. Shapes as calibrate's: x [N, 2, 64]."""
    from spectranet.training.calibrate import EvalSet, OodData

    def band(n: int, centre: int) -> np.ndarray:
        x = rng.normal(0, 0.3, (n, 64))
        x[:, centre - 2:centre + 3] -= 3.0
        return x

    objects = [f"star{k}" for k in range(5)]
    draws = np.concatenate([band(40, 8 + 12 * k) for k in range(5)])
    real = EvalSet(x=np.stack([draws, np.ones_like(draws)], axis=1), y=np.full(200, -1), z=np.zeros(200),
                   objects=np.repeat(objects, 40), sources=np.full(200, "wiserep"))
    test_x = np.concatenate([band(4, 8 + 12 * k) for k in range(5)])
    test = EvalSet(x=np.stack([test_x, np.ones_like(test_x)], axis=1), y=np.full(20, -1), z=np.zeros(20),
                   objects=np.repeat(objects, 4), sources=np.full(20, "wiserep"))
    data = OodData(transients=rng.normal(0, 1, (2000, 64)), templates=band(100, 60), real=real)
    return data, test, rng.normal(0, 1, (1000, 64))


def test_out_of_distribution_fit_learns_the_real_non_transients_and_cross_fitting_leaves_each_object_out():
    from spectranet.training.calibrate import cross_fitted_non_transients, fit_ood

    data, test, x_val = _ood_data(np.random.default_rng(0))
    seen = fit_ood(data, x_val).flag(test.x[:, 0])
    assert seen.mean() >= 0.9  # the shipped score has seen every object's band
    unseen = fit_ood(data, x_val, exclude=frozenset(test.objects.tolist())).flag(test.x[:, 0])
    assert unseen.mean() <= 0.3  # without them only the templates' band is known
    crossed = cross_fitted_non_transients(data, test, x_val, folds=5)
    assert crossed.mean() <= 0.3  # each object scored by a fit that never saw it: no credit for memorising
    assert fit_ood(data, x_val).flag(x_val).mean() == pytest.approx(0.04, abs=0.005)  # threshold on in-taxonomy
