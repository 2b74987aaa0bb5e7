"""End to end on a handful of synthetic spectra: train 2 steps -> checkpoint -> engine -> evaluate (JSON + PNGs)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from spectranet.streamer.errors import ConfigError
from spectranet.streamer.science.checkpoint import load_checkpoint, save_checkpoint
from spectranet.streamer.science.inference import InferenceEngine
from spectranet.streamer.science.model import SpectraNet
from spectranet.streamer.science.preprocess import prepare
from spectranet.streamer.science.taxonomy import CLASSES
from spectranet.training import metrics as M
from spectranet.training.ablation import Variant, run_ablation, winner_overrides
from spectranet.training.calibrate import OOD_REAL_DRAWS, calibrate, evaluation_sets
from spectranet.training.data import load_galaxies, load_spectra, read_manifest, save_pack
from spectranet.training.ensemble import add_redshift_members
from spectranet.training.evaluate import evaluate
from spectranet.training.model_card import decisions_table
from spectranet.training.simulate import sedm_input_bins
from spectranet.training.train import TrainConfig, load_split, train

_LINES = {"Ia": 6150.0, "II": 6563.0, "Ic": 7774.0, "SLSN-I": 4200.0}


def _write(path: Path, *, obj: str, label: str, z: float, frame: str, wave: np.ndarray, flux: np.ndarray,
           kind: str = "calibrated") -> None:
    rows = "\n".join(f"{w:.3f} {f:.6e}" for w, f in zip(wave, flux))
    path.write_text(f"# object: {obj}\n# type: {label}\n# redshift: {z}\n# frame: {frame}\n# flux_kind: {kind}\n"
                    f"# columns: wavelength flux\n{rows}\n")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two objects per class for four classes (two spectra each), one galaxy, two M dwarfs (real non-transients: the
    out-of-distribution fit's negatives), one junk and one ambiguous file."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    lines = ["path,source,object,type,redshift,frame,flux_kind"]
    for label, centre in _LINES.items():
        for k in range(2):
            for epoch in range(2):
                obj = f"SN20{10 + k}{label.lower().replace('-', '')}"
                z = 0.03 + 0.02 * k
                rest = np.arange(3000.0, 9500.0, 4.0)
                flux = (rest / 5000.0) ** -1 * (1 - 0.5 * np.exp(-0.5 * ((rest - centre) / 80.0) ** 2))
                flux = flux * (1 + 0.01 * rng.normal(size=rest.size)) * 1e-15
                name = f"{obj}_{epoch}.txt"
                _write(root / name, obj=obj, label=label, z=z, frame="observed", wave=rest * (1 + z), flux=flux)
                lines.append(f"{name},osc,{obj},{label},{z},observed,calibrated")
    gw = np.arange(1500.0, 11000.0, 5.0)
    _write(root / "gal.txt", obj="galaxy-E", label="Galaxy/E", z=0.0, frame="rest", wave=gw, flux=np.ones_like(gw))
    lines.append("gal.txt,galaxies,galaxy-E,Galaxy/E,0.0,rest,calibrated")
    for k in range(2):  # observed M dwarfs: red, with molecular bands at fixed observed wavelengths
        mw = np.arange(3600.0, 9800.0, 3.0)
        mflux = (mw / 7000.0) ** 3 * (1 - 0.6 * sum(np.exp(-0.5 * ((mw - c) / 60.0) ** 2) for c in (7100, 7700, 8450)))
        _write(root / f"gj{k}.txt", obj=f"gj{k}", label="M-dwarf", z=0.0, frame="observed", wave=mw,
               flux=mflux * (1 + 0.02 * rng.normal(size=mw.size)) * 1e-15)
        lines.append(f"gj{k}.txt,wiserep,gj{k},M-dwarf,0.0,observed,calibrated")
    _write(root / "junk.txt", obj="hst", label="Ia", z=0.01, frame="observed", wave=np.linspace(1, 40, 50),
           flux=np.ones(50))
    lines.append("junk.txt,osc,hst,Ia,0.01,observed,calibrated")
    _write(root / "amb.txt", obj="amb", label="Ib/c", z=0.01, frame="observed", wave=np.linspace(3500, 9000, 500),
           flux=np.ones(500))
    lines.append("amb.txt,osc,amb,Ib/c,0.01,observed,calibrated")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


def test_loader_drops_junk_and_ambiguous(tiny_data: Path):
    entries = read_manifest(tiny_data / "manifest.csv")
    spectra, dropped = load_spectra(entries)
    assert len(spectra) == 16 and {s.label for s in spectra} == set(_LINES)
    assert dropped == {"ambiguous or outside taxonomy": 3, "no overlap with the grid": 1}  # Ib/c and two M dwarfs
    assert len(load_galaxies(entries)) == 1
    s = spectra[0]
    assert s.wave[0] == pytest.approx(3000.0, rel=1e-6) and np.median(s.flux) == pytest.approx(1.0)  # rest frame


def test_two_step_training_checkpoint_engine_and_evaluate(tiny_data: Path, tmp_path: Path):
    cfg = TrainConfig(manifest=str(tiny_data / "manifest.csv"), out_dir=str(tmp_path / "run"), version="0.0.1-test",
                      batch_size=4, warmup_steps=1, max_steps=2, eval_every=1, val_fraction=0.5, val_repeats=1,
                      num_workers=0, resume=False, threads=1, keep_snapshots=True, z_pool_prob=0.5)
    ckpt = train(cfg)
    assert sorted(p.name for p in (tmp_path / "run" / "snapshots").iterdir()) == ["step-000001.pt", "step-000002.pt"]
    loaded = load_checkpoint(tmp_path / "run" / "spectranet-sedm-0.0.1-test")
    assert loaded.weights_sha256 == ckpt.weights_sha256
    assert loaded.taxonomy == CLASSES and loaded.temperature > 0
    assert loaded.extra["trained"] is True and loaded.extra["steps_run"] == 2
    assert loaded.preprocess.normalisation == "continuum"
    assert set(loaded.extra["data"]["train"]) == set(CLASSES)

    engine = InferenceEngine(loaded, device="cpu", warmup=False)
    wave = np.arange(3800.0, 9200.0, 25.6)
    p = prepare(wave, 1.0 + 0.1 * np.sin(wave / 200.0), config=loaded.preprocess)
    (pred,) = engine.predict([p])
    assert pred.top_class in CLASSES and sum(pred.probabilities.values()) == pytest.approx(1.0, abs=1e-5)

    # recalibrated as a new version: the out-of-distribution score leaves the bins no fitting input covered
    calibrated = calibrate(tmp_path / "run" / "spectranet-sedm-0.0.1-test", tmp_path / "cal",
                           data_manifest=tiny_data / "manifest.csv", version="0.0.2-test")
    assert calibrated.version == "0.0.2-test"
    for k, v in calibrated.build_model().state_dict().items():  # the same weights
        assert torch.equal(v, loaded.build_model().state_dict()[k]), k
    ood = load_checkpoint(tmp_path / "cal" / "spectranet-sedm-0.0.2-test").calibration.ood
    assert ood is not None and ood.clip == 5.0
    assert ood.weights[0] == 0.0 and ood.scale[0] == 1.0  # 3500 A: below every simulated SEDM pixel
    fit = calibrated.extra["calibration_fit"]  # the real M dwarfs are negatives of the fit, OOD_REAL_DRAWS each
    assert (fit["n_real_non_transient_objects"], fit["n_real_non_transient_draws"]) == (2, 2 * OOD_REAL_DRAWS)

    out = tmp_path / "eval"
    report = evaluate(model=tmp_path / "cal" / "spectranet-sedm-0.0.2-test", data_manifest=tiny_data / "manifest.csv",
                      out_dir=out, max_templates=20)
    data = json.loads((out / "metrics.json").read_text())
    assert data["summary"]["n"] == report["summary"]["n"] > 0
    ood_summary = data["summary"]["out_of_distribution"]
    assert {"non_transients_flagged", "in_taxonomy_flagged", "real_sedm_flagged"} <= set(ood_summary)
    assert ood_summary["n_non_transients"] == 2  # scored by scores refitted without them, not the shipped one
    assert ood_summary["non_transients_flagged_how"].startswith("cross-fitted")
    assert "SpectraNet_classifier_given_true_z" not in data["summary"]  # one network: no rest-frame classifier
    assert {"SpectraNet", "SpectraNet + templates", "baseline", "SpectraNet_beats_baseline", "ece"} \
        <= set(data["summary"])
    decisions = data["summary"]["decisions"]  # the most probable class against the class called down the tree
    assert set(decisions["SpectraNet + templates"]) == {"top_class", "called_class", "note"}
    main = data["sets"][data["summary"]["set"]]["model_refined"]
    assert decisions["SpectraNet + templates"]["top_class"]["accuracy"] == pytest.approx(main["accuracy"])
    assert decisions["SpectraNet + templates"]["top_class"]["ia_vs_non_ia_accuracy"] == \
        pytest.approx(main["ia_vs_non_ia_accuracy"])
    assert "| called_class (down the tree) |" in decisions_table(data["summary"])
    for name in ("confusion.png", "confusion_baseline.png", "redshift.png", "pr.png", "reliability.png",
                 "purity_completeness.png"):
        assert (out / name).stat().st_size > 1000

    # a user's own manifest of real files
    user = tmp_path / "mine.csv"
    user.write_text(f"path,type,redshift\n{tiny_data / 'SN2010ia_0.txt'},SN Ia,0.03\n"
                    f"{tiny_data / 'SN2011ii_1.txt'},II P,0.05\n{tiny_data / 'amb.txt'},Ib/c,0.01\n")
    report = evaluate(model=tmp_path / "run" / "spectranet-sedm-0.0.1-test", manifest=user,
                      data_manifest=tiny_data / "manifest.csv", out_dir=tmp_path / "eval2", max_templates=20)
    assert report["summary"]["n"] == 2


def test_pack_round_trip_and_training_reads_it(tiny_data: Path, tmp_path: Path):
    cfg = TrainConfig(manifest=str(tiny_data / "manifest.csv"), val_fraction=0.5)
    train_s, val_s, galaxies, summary = load_split(cfg)
    pack = tmp_path / "spectra.npz"
    save_pack(pack, train=train_s, val=val_s, galaxies=galaxies, summary=summary)
    train_p, val_p, galaxies_p, summary_p = load_split(TrainConfig(spectra_pack=str(pack)))
    assert [s.path for s in train_p] == [s.path for s in train_s] and [s.path for s in val_p] == [s.path for s in val_s]
    for a, b in zip(train_s + val_s, train_p + val_p):
        assert (b.label, b.object_id, b.source, b.redshift, b.epoch) == (a.label, a.object_id, a.source, a.redshift,
                                                                         a.epoch)
        np.testing.assert_allclose(b.wave, a.wave, rtol=1e-6)
        np.testing.assert_allclose(b.flux, a.flux, rtol=1e-3)  # float16
    assert len(galaxies_p) == len(galaxies) and summary_p == json.loads(json.dumps(summary))
    with pytest.raises(ConfigError, match="max_spectra"):
        load_split(TrainConfig(spectra_pack=str(pack), max_spectra=3))


def test_ablation_trains_every_variant_on_the_same_batches(tiny_data: Path, tmp_path: Path):
    cfg = TrainConfig(manifest=str(tiny_data / "manifest.csv"), out_dir=str(tmp_path / "abl"), batch_size=4,
                      warmup_steps=1, max_steps=2, eval_every=1, val_fraction=0.5, num_workers=0, threads=1)
    variants = (Variant("max"), Variant("max-again"), Variant("two", two_networks=True),
                Variant("bn-robust", norm="batch", input="observed-robust", lr_scale=3.0))
    report = run_ablation(cfg, variants)
    res = {r["variant"]["name"]: r for r in report["results"]}
    assert set(report["ranking"]) == set(res) == {v.name for v in variants} and report["steps"] == 2
    # same seed, same batches, same dropout masks: an identical design gives identical numbers; another does not
    assert res["max"]["history"] == res["max-again"]["history"] != res["bn-robust"]["history"]
    assert len(res["two"]["history"]) == 2 and res["two"]["parameters"] == 2 * res["max"]["parameters"]
    best = [r["best"]["val_macro_f1"] for r in report["results"]]
    assert best == sorted(best, reverse=True)
    assert json.loads((tmp_path / "abl" / "ablation.json").read_text())["ranking"] == report["ranking"]
    winner = winner_overrides(report)
    top = report["results"][0]["variant"]
    assert winner == {"pooling": top["pooling"], "norm": top["norm"],
                      "normalisation": "robust" if top["input"] == "observed-robust" else "continuum",
                      "lr": cfg.lr * top["lr_scale"], "two_networks": top["two_networks"]}


def test_two_networks_train_export_and_run_in_the_engine(tiny_data: Path, tmp_path: Path):
    cfg = TrainConfig(manifest=str(tiny_data / "manifest.csv"), out_dir=str(tmp_path / "two"), version="0.0.2-test",
                      two_networks=True, batch_size=4, warmup_steps=1, max_steps=2, eval_every=1, val_fraction=0.5,
                      num_workers=0, resume=False, threads=1)
    ckpt = train(cfg)
    loaded = load_checkpoint(tmp_path / "two" / "spectranet-sedm-0.0.2-test")
    assert loaded.weights_sha256 == ckpt.weights_sha256 and loaded.model_config.two_networks
    assert loaded.model_config.rest_bins == 3 * loaded.model_config.n_bins // 2
    assert loaded.model_config.log_step == pytest.approx(math.log(10000 / 3500) / loaded.preprocess.grid.n_bins)
    wave = np.arange(3800.0, 9200.0, 25.6)
    p = prepare(wave, 1.0 + 0.1 * np.sin(wave / 200.0), config=loaded.preprocess)
    (a,) = InferenceEngine(loaded, device="cpu", warmup=False).predict([p])
    (b,) = InferenceEngine(ckpt, device="cpu", warmup=False).predict([p])
    assert a.probabilities == pytest.approx(b.probabilities) and a.z == pytest.approx(b.z)

    # evaluate also scores the classifier on the rest frame of the true z; recompute that by hand
    report = evaluate(model=tmp_path / "two" / "spectranet-sedm-0.0.2-test", data_manifest=tiny_data / "manifest.csv",
                      out_dir=tmp_path / "eval-two", max_templates=4)
    given = report["summary"]["SpectraNet_classifier_given_true_z"]
    _, val, galaxies, _ = load_split(cfg)
    main = evaluation_sets(val, galaxies, loaded.preprocess)[report["summary"]["set"]]
    x, y, z = main.x, main.y, main.z
    net = loaded.build_model().eval()
    with torch.no_grad():
        logits = net(torch.from_numpy(x), torch.from_numpy(z).float()).logits.numpy()
    by_hand = M.classification_report(y, M.softmax(logits, loaded.temperature), CLASSES)
    assert given["macro_f1"] == pytest.approx(by_hand["macro_f1"])
    assert given["accuracy"] == pytest.approx(by_hand["accuracy"])


def test_init_from_starts_from_a_checkpoints_weights(tiny_data: Path, tmp_path: Path):
    """With lr 0 nothing moves, so a run started from A exports A's weights, and a run started afresh does not."""
    base: dict[str, Any] = dict(manifest=str(tiny_data / "manifest.csv"), two_networks=True, batch_size=4,
                                warmup_steps=1, max_steps=1, eval_every=1, val_fraction=0.5, num_workers=0,
                                resume=False, threads=1)
    a = train(TrainConfig(**base, out_dir=str(tmp_path / "a"), version="0.0.1-a", seed=3))
    src = str(tmp_path / "a" / "spectranet-sedm-0.0.1-a")
    b = train(TrainConfig(**base, out_dir=str(tmp_path / "b"), version="0.0.1-b", lr=0.0, init_from=src,
                          z_noise=0.01, pred_z_fraction=0.5))
    c = train(TrainConfig(**base, out_dir=str(tmp_path / "c"), version="0.0.1-c", lr=0.0))
    wa, wb, wc = (ck.build_model().state_dict() for ck in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    # test-time classifier views (set at assembly) are not weights: a run starts from such a checkpoint as well
    viewed = add_redshift_members(src, [], str(tmp_path / "v"), version="0.0.1-v", classifier_views=(-0.02, 0.02))
    assert viewed.model_config.classifier_views == (-0.02, 0.02)
    e = train(TrainConfig(**base, out_dir=str(tmp_path / "e"), version="0.0.1-e", lr=0.0,
                          init_from=str(tmp_path / "v" / "spectranet-sedm-0.0.1-v")))
    assert e.model_config.classifier_views == () and all(torch.equal(wa[k], v) for k, v in
                                                         e.build_model().state_dict().items())
    # weights from a snapshot of the base's run (keep_snapshots) instead of its exported best step
    snap = tmp_path / "snap.pt"
    torch.save(c.build_model().state_dict(), snap)
    from_snap = add_redshift_members(src, [], str(tmp_path / "s"), version="0.0.1-s", weights=snap)
    assert all(torch.equal(wc[k], v) for k, v in from_snap.build_model().state_dict().items())
    assert from_snap.extra["weights_from_snapshot"] == "snap.pt"
    torch.save({k: v for k, v in wc.items() if not k.startswith("rest_net.")}, tmp_path / "part.pt")
    with pytest.raises(ConfigError, match="snapshot"):
        add_redshift_members(src, [], str(tmp_path / "s2"), version="0.0.1-s2", weights=tmp_path / "part.pt")
    # new models read the input bins the SEDM simulation covers; an older checkpoint (all bins) is set so at assembly
    assert a.model_config.input_bins == sedm_input_bins(a.preprocess.grid) == (16, 240)
    old = add_redshift_members(src, [], str(tmp_path / "o"), version="0.0.1-o")
    assert old.model_config.input_bins == (16, 240)  # the base's, kept
    legacy = save_checkpoint(SpectraNet(replace(a.model_config, input_bins=())), tmp_path / "l" / "m-0.0.1",
                             name="m", version="0.0.1", taxonomy=a.taxonomy, preprocess=a.preprocess)
    assert legacy.model_config.input_bins == ()
    read = add_redshift_members(tmp_path / "l" / "m-0.0.1", [], str(tmp_path / "r"), version="0.0.2",
                                sedm_input_bins_only=True)
    assert read.model_config.input_bins == (16, 240)
    f = train(TrainConfig(**base, out_dir=str(tmp_path / "f"), version="0.0.1-f", lr=0.0,
                          init_from=str(tmp_path / "l" / "m-0.0.1")))  # weights match: a run starts from it
    assert f.model_config.input_bins == (16, 240)
    with pytest.raises(ConfigError, match="architecture"):
        train(TrainConfig(**{**base, "two_networks": False}, out_dir=str(tmp_path / "d"), init_from=src))


def test_redshift_members_from_another_checkpoint(tiny_data: Path, tmp_path: Path):
    """The assembled model's z is the inverse-variance combination of both checkpoints' redshift networks, its
    classes the base classifier's at that z; a donor of another architecture is refused."""
    from spectranet.streamer.science.model import combine_redshifts

    base: dict[str, Any] = dict(manifest=str(tiny_data / "manifest.csv"), two_networks=True, batch_size=4,
                                warmup_steps=1, max_steps=1, eval_every=1, val_fraction=0.5, num_workers=0,
                                resume=False, threads=1)
    a = train(TrainConfig(**base, out_dir=str(tmp_path / "a"), version="0.0.1-a", seed=3))
    b = train(TrainConfig(**base, out_dir=str(tmp_path / "b"), version="0.0.1-b", seed=4))
    path_a, path_b = tmp_path / "a" / "spectranet-sedm-0.0.1-a", tmp_path / "b" / "spectranet-sedm-0.0.1-b"
    both = add_redshift_members(path_a, [path_b], tmp_path / "ab", version="0.0.2")
    loaded = load_checkpoint(tmp_path / "ab" / "spectranet-sedm-0.0.2")
    assert loaded.model_config.redshift_members == 2 and loaded.extra["redshift_members"][0]["version"] == "0.0.1-b"
    assert loaded.weights_sha256 == both.weights_sha256
    net_a, net_b, net_ab = (ck.build_model().eval() for ck in (a, b, loaded))
    x = torch.from_numpy(np.random.default_rng(0).normal(0, 0.3, (3, 2, a.model_config.n_bins)).astype(np.float32))
    x[:, 1] = 1.0
    with torch.no_grad():
        oa, ob, oab = net_a(x), net_b(x), net_ab(x)
        z, _ = combine_redshifts(torch.stack([oa.z_mean, ob.z_mean]), torch.stack([oa.z_logvar, ob.z_logvar]))
        torch.testing.assert_close(oab.z_mean, z)
        torch.testing.assert_close(oab.logits, net_a.classify_at(x, z.clamp(0.0, a.model_config.max_shift_z)))
    # test-time views of the classifier, with or without members: the mean of the base classifier's shifted views
    viewed = add_redshift_members(path_ab := tmp_path / "ab" / "spectranet-sedm-0.0.2", [], tmp_path / "abv",
                                  version="0.0.3", classifier_views=(-0.02, 0.02))
    assert viewed.model_config.classifier_views == (-0.02, 0.02) and viewed.model_config.redshift_members == 2
    net_v = load_checkpoint(tmp_path / "abv" / "spectranet-sedm-0.0.3").build_model().eval()
    with torch.no_grad():
        zc = z.clamp(0.0, a.model_config.max_shift_z)
        shifted = [net_a.classify_at(x, torch.expm1(torch.log1p(zc) + d)) for d in (-0.02, 0.02)]
        torch.testing.assert_close(net_v(x).logits, torch.stack(shifted).mean(0))
    assert load_checkpoint(path_ab).model_config.classifier_views == ()
    one = train(TrainConfig(**{**base, "two_networks": False}, out_dir=str(tmp_path / "c"), version="0.0.1-c"))
    with pytest.raises(ConfigError, match="architecture"):
        add_redshift_members(path_a, [tmp_path / "c" / "spectranet-sedm-0.0.1-c"], tmp_path / "ac", version="0.0.2")
    assert one.model_config.redshift_members == 1


def test_refit_head_changes_only_the_classifiers_last_layer(tiny_data: Path, tmp_path: Path, monkeypatch):
    """The refitted checkpoint differs from its source in the rest-frame classifier's last Linear only, records how it
    was refitted, and the refit reads the training objects alone (the validation objects' spectra are never drawn)."""
    from spectranet.training import refit_head as rh

    base: dict[str, Any] = dict(manifest=str(tiny_data / "manifest.csv"), two_networks=True, batch_size=4,
                                warmup_steps=1, max_steps=1, eval_every=1, val_fraction=0.5, num_workers=0,
                                resume=False, threads=1)
    src = train(TrainConfig(**base, out_dir=str(tmp_path / "a"), version="0.0.1", seed=3))
    train_spectra, val_spectra, _, _ = load_split(TrainConfig.from_checkpoint(src.extra,
                                                                              manifest=base["manifest"]))
    seen: list[set[str]] = []
    real_degraded = rh.real_degraded

    def spy(spectra, *args, **kwargs):
        seen.append({s.object_id for s in spectra})
        return real_degraded(spectra, *args, **kwargs)

    monkeypatch.setattr(rh, "real_degraded", spy)
    new = rh.refit_head(tmp_path / "a" / "spectranet-sedm-0.0.1", tmp_path / "h", version="0.0.2",
                        manifest=base["manifest"], settings=rh.HeadRefit(repeats=2, l2=1e-3))
    assert seen == [{s.object_id for s in train_spectra}] * 2
    assert not seen[0] & {s.object_id for s in val_spectra}
    loaded = load_checkpoint(tmp_path / "h" / "spectranet-sedm-0.0.2")
    assert loaded.weights_sha256 == new.weights_sha256 != src.weights_sha256
    assert loaded.extra["head_refit"]["repeats"] == 2 and loaded.extra["head_refit"]["spectra"] > 0
    assert loaded.extra["head_refit"]["from"]["weights_sha256"] == src.weights_sha256
    before, after = src.build_model().state_dict(), loaded.build_model().state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"rest_net.classifier.weight", "rest_net.classifier.bias"}
