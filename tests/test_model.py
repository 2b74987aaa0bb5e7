"""Tests of spectranet.streamer.science.model: both presets build and train, the config validates and round-trips, CPU
determinism, and parameter and FLOP counts checked against counts worked out from the architecture by hand."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from spectranet.streamer.science.model import (
    DEFAULT_PRESET,
    PRESETS,
    ModelConfig,
    MultiScalePool,
    SpectraNet,
    combine_redshifts,
    count_flops,
    count_parameters,
    rest_frame_view,
)

MULTISCALE = replace(PRESETS["default"], pooling="multiscale")
BATCHNORM = replace(PRESETS["default"], norm="batch")
LOG_STEP = math.log(10000.0 / 3500.0) / 256
TWO = replace(PRESETS["default"], two_networks=True, rest_bins=384, log_step=LOG_STEP)
CONFIGS = {**PRESETS, "default-multiscale": MULTISCALE, "default-batchnorm": BATCHNORM, "default-two-networks": TWO}
BATCH = {"default": 3, "fine": 3, "paper": 2, "default-multiscale": 3, "default-batchnorm": 3,
         "default-two-networks": 3}  # the paper preset is ~35 GFLOP per spectrum


@pytest.fixture(scope="module")
def models() -> dict[str, SpectraNet]:
    torch.manual_seed(0)
    return {name: SpectraNet(config) for name, config in CONFIGS.items()}


def _input(config: ModelConfig, batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    flux = torch.randn(batch, 1, config.n_bins, generator=g)
    coverage = (torch.rand(batch, 1, config.n_bins, generator=g) > 0.1).float()
    return torch.cat([flux * coverage, coverage], dim=1)  # [B, 2, n_bins]


def _expected_parameters(c: ModelConfig) -> int:
    """Parameters of the architecture as issue 3 describes it, counted by hand."""
    if c.two_networks:  # a redshift network without class head + a rest-frame classifier without redshift head
        single = _expected_parameters(replace(c, two_networks=False, rest_bins=0))
        return 2 * single - (c.hidden * c.n_classes + c.n_classes) - (c.hidden * 2 + 2)
    total, in_ch = 0, c.in_channels
    per_pool = 3 if c.pooling == "multiscale" else 1
    for width, kernels in zip(c.widths, c.kernels):
        total += sum(in_ch * width * k + width for k in kernels)  # parallel convolutions with bias
        total += 2 * len(kernels) * width                          # channel LayerNorm or BatchNorm (weight, bias)
        total += len(kernels) * width * width + width              # 1x1 mix back to the stage width
        in_ch = width * per_pool
    feat = 2 * c.widths[-1]                                        # global average + max
    total += feat * c.hidden + c.hidden                            # MLP trunk
    total += c.hidden * c.n_classes + c.n_classes                  # class head
    total += c.hidden * 2 + 2                                      # redshift head (mean, log-variance)
    return total


def _expected_flops(c: ModelConfig) -> int:
    """Multiply-adds x 2 of every convolution and linear layer for one spectrum."""
    total, in_ch, length = 0, c.in_channels, c.n_bins
    per_pool = 3 if c.pooling == "multiscale" else 1
    for i, (width, kernels) in enumerate(zip(c.widths, c.kernels)):
        total += sum(2 * in_ch * width * k * length for k in kernels)
        total += 2 * len(kernels) * width * width * length
        in_ch = width * per_pool
        if i < len(c.widths) - 1:
            length //= 2
    total += 2 * (2 * c.widths[-1] * c.hidden + c.hidden * c.n_classes + c.hidden * 2)
    return total


# ------------------------------------------------------------------------------------------------ presets, shapes


def test_presets_match_the_issue():
    assert DEFAULT_PRESET in PRESETS
    paper = PRESETS["paper"]
    assert paper.n_bins == 4096
    assert paper.widths[0] == 64 and paper.widths[-1] == 1024 and len(paper.widths) == 5
    assert max(k for ks in paper.kernels for k in ks) > 1000
    assert all(len(ks) == 3 for c in PRESETS.values() for ks in c.kernels)  # three parallel convolutions per stage
    assert all(c.n_classes == 9 for c in PRESETS.values())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_shapes(models, name):
    model, config = models[name].eval(), CONFIGS[name]
    b = BATCH[name]
    with torch.no_grad():
        out = model(_input(config, b))
    assert out.logits.shape == (b, config.n_classes)
    assert out.z_mean.shape == (b,)
    assert out.z_logvar.shape == (b,)
    for t in (out.logits, out.z_mean, out.z_logvar):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_reach_every_parameter(models, name):
    model, config = models[name].train(), CONFIGS[name]
    model.zero_grad(set_to_none=True)
    b = 1 if name == "paper" else BATCH[name]
    out = model(_input(config, b))
    labels = torch.arange(b) % config.n_classes
    z_true = torch.linspace(0.01, 0.3, b)
    loss = F.cross_entropy(out.logits, labels) + F.gaussian_nll_loss(out.z_mean, z_true, out.z_logvar.exp())
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"
    model.zero_grad(set_to_none=True)
    model.eval()


def test_each_head_trains_through_the_shared_trunk(models):
    model, config = models["default"].train(), CONFIGS["default"]
    x = _input(config, 2)
    for head, loss_of in (("classifier", lambda o: o.logits.sum()), ("redshift", lambda o: o.z_mean.sum())):
        model.zero_grad(set_to_none=True)
        loss_of(model(x)).backward()
        other = "redshift" if head == "classifier" else "classifier"
        assert getattr(model, head).weight.grad.abs().sum() > 0
        assert getattr(model, other).weight.grad is None
        assert model.stages[0].branches[0].weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model.eval()


def test_multiscale_pooling_concatenates_max_average_and_min():
    x = torch.tensor([[[1.0, 3.0, 2.0, 0.0]]])  # [1, 1, 4]
    out = MultiScalePool()(x)
    assert out.shape == (1, 3, 2)
    torch.testing.assert_close(out[0], torch.tensor([[3.0, 2.0], [2.0, 1.0], [1.0, 0.0]]))


def test_multiscale_variant_triples_the_channels_between_stages(models):
    model = models["default-multiscale"]
    widths = MULTISCALE.widths
    for prev, stage in zip(widths[:-1], model.stages[1:]):
        assert stage.branches[0].in_channels == 3 * prev
    assert isinstance(model.pool, MultiScalePool)
    assert not isinstance(models["default"].pool, MultiScalePool)


def test_output_of_one_spectrum_does_not_depend_on_its_batch(models):
    model, config = models["default"].eval(), CONFIGS["default"]
    x = _input(config, 4)
    with torch.no_grad():
        together = model(x)
        alone = [model(x[i:i + 1]) for i in range(4)]
    torch.testing.assert_close(together.logits, torch.cat([o.logits for o in alone]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together.z_mean, torch.cat([o.z_mean for o in alone]), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize("kwargs, message", [
    ({"widths": (8, 16, 32), "kernels": ((5, 3, 1), (5, 3, 1))}, "one entry per stage"),
    ({"widths": (8,), "kernels": ((5, 3, 1), (5, 3, 1))}, "one entry per stage"),
    ({"widths": (8, 16), "kernels": ((5, 4, 1), (5, 3, 1))}, "odd"),
    ({"widths": (8, 16), "kernels": ((5, 3, 1), (2, 3, 1))}, "odd"),
    ({"n_bins": 1000}, "divisible"),
    ({"pooling": "avg"}, "pooling"),
    ({"norm": "group"}, "norm"),
    ({"two_networks": True, "rest_bins": 1536, "log_step": 0.0}, "log_step"),
    ({"two_networks": True, "rest_bins": 1000, "log_step": 0.001}, "rest_bins"),
    ({"two_networks": True, "rest_bins": 512, "log_step": 0.001}, "rest_bins"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trips_through_json(name):
    config = CONFIGS[name]
    back = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config
    assert isinstance(back.widths, tuple) and all(isinstance(k, tuple) for k in back.kernels)
    assert hash(back) == hash(config)  # frozen and hashable again, not lists


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(TypeError):
        ModelConfig.from_dict({**PRESETS["default"].to_dict(), "n_layers": 3})


# ------------------------------------------------------------------------------------------------ determinism


def test_same_input_twice_gives_identical_outputs(models):
    model, config = models["default-multiscale"].eval(), CONFIGS["default-multiscale"]
    x = _input(config, 3)
    with torch.no_grad():
        a, b = model(x), model(x.clone())
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.z_mean, b.z_mean)
    assert torch.equal(a.z_logvar, b.z_logvar)


def test_same_seed_gives_identical_init_and_another_seed_does_not():
    def build(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return SpectraNet(PRESETS["default"]).state_dict()

    a, b, c = build(7), build(7), build(8)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_eval_mode_disables_dropout_and_train_mode_uses_it(models):
    model, config = models["default"], CONFIGS["default"]
    x = _input(config, 2)
    with torch.no_grad():
        model.train()
        torch.manual_seed(0)
        t1 = model(x).logits
        torch.manual_seed(1)
        t2 = model(x).logits
        model.eval()
        torch.manual_seed(0)
        e1 = model(x).logits
        torch.manual_seed(1)
        e2 = model(x).logits
    assert not torch.equal(t1, t2)
    assert torch.equal(e1, e2)


# ------------------------------------------------------------------------------------------------ size


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_count_matches_the_architecture(models, name):
    assert count_parameters(models[name]) == _expected_parameters(CONFIGS[name])


def test_parameter_counts_of_the_presets(models):
    assert 20_000_000 <= count_parameters(models["paper"]) <= 30_000_000
    assert count_parameters(models["default"]) < count_parameters(models["paper"]) / 10  # CPU-friendly


@pytest.mark.parametrize("name", ["default", "fine", "default-multiscale"])
def test_count_flops_matches_a_count_by_hand(models, name):
    assert count_flops(models[name].eval()) == _expected_flops(CONFIGS[name])


def test_paper_preset_flops_are_two_orders_above_the_default():
    # analytic count only: counting by running the paper preset is done by bench/bench_model.py (BENCHMARKS.md)
    assert _expected_flops(PRESETS["paper"]) > 50 * _expected_flops(PRESETS["default"])


# ---------------------------------------------------------------------------------------------- two networks


def test_rest_frame_view_shifts_by_ln_one_plus_z_over_the_step():
    n, rest = 256, 384
    x = torch.zeros(2, 2, n)
    x[:, 0, 100] = 1.0
    x[:, 1, :] = 1.0
    shift = 7  # bins
    z = torch.tensor([0.0, math.expm1(shift * LOG_STEP)])
    out = rest_frame_view(x, z, log_step=LOG_STEP, rest_bins=rest)
    assert out.shape == (2, 2, rest)
    assert int(out[0, 0].argmax()) == 100 + (rest - n) and int(out[1, 0].argmax()) == 100 + (rest - n) - shift
    torch.testing.assert_close(out[1, 0].sum(), torch.tensor(1.0))
    # coverage: zero blueward of the input's first bin and redward of its last, one in between
    covered = torch.nonzero(out[1, 1] > 0.5).squeeze(1)
    assert int(covered[0]) == rest - n - shift and int(covered[-1]) == rest - 2 - shift
    # half a bin: linear interpolation splits the line between two rest bins
    half = rest_frame_view(x, torch.tensor([math.expm1(0.5 * LOG_STEP)]), log_step=LOG_STEP, rest_bins=rest)
    torch.testing.assert_close(half[0, 0, 100 + rest - n - 1: 100 + rest - n + 1], torch.tensor([0.5, 0.5]))


def test_two_networks_classify_the_rest_frame_of_the_given_or_predicted_z(models):
    model = models["default-two-networks"].eval()
    x = _input(TWO, 3)
    with torch.no_grad():
        own = model(x)
        given_own = model(x, own.z_mean.clamp(0.0, TWO.max_shift_z))
        other = model(x, torch.full((3,), 0.3))
    torch.testing.assert_close(own.logits, given_own.logits)  # without z it uses its own estimate
    torch.testing.assert_close(own.z_mean, other.z_mean)       # z never depends on the shift
    assert not torch.allclose(own.logits, other.logits)        # the classifier sees another rest frame
    assert model.classifier is None and model.rest_net.redshift is None
    assert TWO.max_shift_z == pytest.approx(math.expm1(128 * LOG_STEP)) and TWO.max_shift_z > 0.6


def test_nan_redshift_rows_use_the_networks_own_estimate(models):
    model = models["default-two-networks"].eval()
    x = _input(TWO, 4)
    given = torch.tensor([0.3, math.nan, 0.1, math.nan])
    with torch.no_grad():
        mixed, own, fixed = model(x, given), model(x), model(x, torch.tensor([0.3, 0.0, 0.1, 0.0]))
    torch.testing.assert_close(mixed.logits[[1, 3]], own.logits[[1, 3]])
    torch.testing.assert_close(mixed.logits[[0, 2]], fixed.logits[[0, 2]])
    assert torch.isfinite(mixed.logits).all() and not torch.allclose(mixed.logits[[0, 2]], own.logits[[0, 2]])


def test_redshift_members_combine_by_inverse_variance_in_ln_one_plus_z():
    z = torch.tensor([[0.10, 0.50, 0.0], [0.30, 0.50, -0.2]])       # [M=2, B=3]; a negative z counts as 0
    var_ln = torch.tensor([[1e-4, 1e-2, 1e-2], [1e-2, 1e-2, 1e-2]])   # variance of ln(1 + z)
    logvar = torch.log(var_ln * (1.0 + z.clamp(min=0.0)) ** 2)       # the heads' variance is of z itself
    mean, comb_logvar = combine_redshifts(z, logvar)
    w = 1.0 / var_ln[:, 0]
    expected = math.expm1(float((w * torch.log1p(z[:, 0])).sum() / w.sum()))
    assert float(mean[0]) == pytest.approx(expected, rel=1e-5) and abs(float(mean[0]) - 0.10) < 0.003  # the sure one
    assert float(mean[1]) == pytest.approx(0.5, rel=1e-6)            # agreeing members: the same z ...
    var1 = float(torch.exp(comb_logvar[1])) / 1.5 ** 2
    assert var1 == pytest.approx(0.5e-2, rel=1e-4)                   # ... with half the variance
    assert float(mean[2]) == pytest.approx(0.0, abs=1e-7)


def test_a_model_with_redshift_members_classifies_the_combined_redshift(models):
    base = models["default-two-networks"].eval()
    cfg = replace(TWO, redshift_members=2)
    model = SpectraNet(cfg).eval()
    assert set(model.state_dict()) == set(base.state_dict()) | {f"z_members.0.{k}" for k in base.state_dict()
                                                                   if not k.startswith("rest_net.")}
    x = _input(TWO, 3)
    with torch.no_grad():
        out = model(x)
        first: SpectraNet = model.z_members[0]  # type: ignore[assignment]
        member = first._redshift(first.features(x))
        own = model._redshift(model.features(x))
        z, logvar = combine_redshifts(torch.stack([own[0], member[0]]), torch.stack([own[1], member[1]]))
    torch.testing.assert_close(out.z_mean, z)
    torch.testing.assert_close(out.logits, model.classify_at(x, z.clamp(0.0, cfg.max_shift_z)))
    with pytest.raises(ValueError, match="redshift_members"):
        replace(PRESETS["default"], redshift_members=2)  # one network has no rest frame to hand on


def test_classifier_views_average_the_logits_of_shifted_rest_frame_views(models):
    """``classifier_views``: the logits are the mean of the one-view logits at ln(1 + z) + d, same weights, same
    parameters; the views are one batch, so a spectrum's result does not depend on its neighbours."""
    base = models["default-two-networks"].eval()
    cfg = replace(TWO, classifier_views=(-0.02, 0.0, 0.02))
    model = SpectraNet(cfg).eval()
    model.load_state_dict(base.state_dict(), strict=True)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    x, z = _input(TWO, 3), torch.tensor([0.02, 0.1, 0.3])
    with torch.no_grad():
        views = [base.classify_at(x, torch.expm1(torch.log1p(z) + d)) for d in cfg.classifier_views]
        torch.testing.assert_close(model.classify_at(x, z), torch.stack(views).mean(0))
        assert not torch.allclose(model.classify_at(x, z), base.classify_at(x, z), atol=1e-4)
        torch.testing.assert_close(model.classify_at(x[1:2], z[1:2]), model.classify_at(x, z)[1:2])
        out = model(x)
        torch.testing.assert_close(out.logits, model.classify_at(x, out.z_mean.clamp(0.0, cfg.max_shift_z)))
    with pytest.raises(ValueError, match="classifier_views"):
        replace(PRESETS["default"], classifier_views=(0.0,))  # one network has no rest-frame classifier


def test_input_bins_zero_the_bins_outside_before_either_network_reads_them(models):
    """``input_bins``: flux and coverage outside (first, stop) do not change any output (redshift, logits, features,
    classify_at); inside they do; the same weights with () read everything; sub-networks keep their own input."""
    base = models["default-two-networks"].eval()
    cfg = replace(TWO, input_bins=(16, 240))
    model = SpectraNet(cfg).eval()
    model.load_state_dict(base.state_dict(), strict=True)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert model.rest_net is not None and model.rest_net.config.input_bins == ()
    x, z = _input(TWO, 3), torch.tensor([0.02, 0.1, 0.3])
    wide = x.clone()
    wide[:, 0, :16], wide[:, 0, 240:], wide[:, 1, :16], wide[:, 1, 240:] = 3.0, -2.0, 1.0, 1.0
    cropped = x.clone()
    cropped[:, :, :16], cropped[:, :, 240:] = 0.0, 0.0
    with torch.no_grad():
        a, b = model(wide), base(cropped)
        torch.testing.assert_close(a.z_mean, b.z_mean)
        torch.testing.assert_close(a.logits, b.logits)
        torch.testing.assert_close(a.features, b.features)
        torch.testing.assert_close(model.classify_at(wide, z), base.classify_at(cropped, z))
        assert not torch.allclose(base(wide).z_mean, b.z_mean)  # the old reading sees the outer bins
        inside = wide.clone()
        inside[:, 0, 100] += 5.0
        assert not torch.allclose(model(inside).z_mean, a.z_mean)
    for bad in [(0,), (5, 5), (-1, 10), (0, 257)]:
        with pytest.raises(ValueError, match="input_bins"):
            replace(TWO, input_bins=bad)
