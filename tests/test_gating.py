"""Gate schedules (loss weighting over t) and the learned per-bin weighting: weights as specified."""

from __future__ import annotations

import math

import pytest
import torch

from pixelgen.config import load_config
from pixelgen.errors import ConfigError
from pixelgen.gating import LearnedTimeWeighting, check_schedule, gate_weights, learned_weighting_for, zero_below


def loss_cfg(**changes) -> dict:
    cfg = load_config()["loss"]
    cfg.update(changes)
    check_schedule(cfg)
    return cfg


def test_step_is_the_paper_gate_with_the_official_greater_or_equal():
    t = torch.tensor([0.0, 0.29, 0.3, 0.31, 1.0])
    assert gate_weights(t, loss_cfg(gate=0.3)).tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]


def test_sigmoid_ramp_is_zero_and_one_exactly_three_widths_out_and_a_logistic_between():
    cfg = loss_cfg(gate_schedule="sigmoid", gate=0.4, gate_width=0.05)
    t = torch.tensor([0.0, 0.25, 0.4, 0.55, 0.9])
    w = gate_weights(t, cfg)
    assert w[0] == 0 and w[1] == 0 and w[3] == 1 and w[4] == 1
    assert w[2].item() == pytest.approx(0.5, abs=1e-6)  # symmetric around the gate
    lo, hi = 1 / (1 + math.exp(3)), 1 / (1 + math.exp(-3))
    t_mid = 0.43
    expected = (1 / (1 + math.exp(-(t_mid - 0.4) / 0.05)) - lo) / (hi - lo)
    assert gate_weights(torch.tensor([t_mid]), cfg).item() == pytest.approx(expected, rel=1e-5)
    assert zero_below(cfg) == pytest.approx(0.25)


def test_linear_ramp_between_its_two_times():
    cfg = loss_cfg(gate_schedule="linear", gate_start=0.2, gate_end=0.6)
    w = gate_weights(torch.tensor([0.1, 0.2, 0.3, 0.5, 0.6, 0.8]), cfg)
    assert w.tolist() == pytest.approx([0.0, 0.0, 0.25, 0.75, 1.0, 1.0], abs=1e-6)


def test_power_is_a_power_of_the_time_above_the_gate():
    cfg = loss_cfg(gate_schedule="power", gate=0.2, gate_power=2.0)
    w = gate_weights(torch.tensor([0.1, 0.2, 0.6, 1.0]), cfg)
    assert w.tolist() == pytest.approx([0.0, 0.0, 0.25, 1.0], abs=1e-6)
    t = torch.tensor([0.3, 0.7])
    assert gate_weights(t, loss_cfg(gate_schedule="power", gate=0.0, gate_power=3.0)).tolist() == \
        pytest.approx((t ** 3).tolist())


def test_every_fixed_schedule_stays_in_zero_one():
    t = torch.linspace(0, 1, 1001)
    for cfg in (loss_cfg(), loss_cfg(gate_schedule="sigmoid"), loss_cfg(gate_schedule="linear"),
                loss_cfg(gate_schedule="power")):
        w = gate_weights(t, cfg)
        assert w.min() >= 0 and w.max() <= 1 and w[-1] == 1
        assert bool((w[1:] >= w[:-1]).all()), cfg["gate_schedule"]  # more weight as the image gets cleaner


@pytest.mark.parametrize("changes, named", [
    ({"gate_schedule": "cosine"}, "loss.gate_schedule"),
    ({"gate_schedule": "sigmoid", "gate_width": 0.0}, "loss.gate_width"),
    ({"gate_schedule": "linear", "gate_start": 0.5, "gate_end": 0.5}, "loss.gate_start"),
    ({"gate_schedule": "power", "gate_power": 0.0}, "loss.gate_power"),
    ({"gate_schedule": "learned", "learned_weight_bins": 0}, "loss.learned_weight_bins"),
])
def test_bad_gate_settings_are_one_line_errors_naming_the_key(changes, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        loss_cfg(**changes)


def test_learned_weighting_bins_times_and_weights_the_loss_by_its_log_variance():
    weighting = LearnedTimeWeighting(("lpips", "pdino"), bins=4)
    assert weighting.bin_of(torch.tensor([0.0, 0.24, 0.25, 0.99, 1.0])).tolist() == [0, 0, 1, 3, 3]
    with torch.no_grad():
        weighting.log_variance[0] = torch.tensor([0.0, 1.0, 2.0, 3.0])
    loss = torch.tensor([2.0, 2.0])
    out = weighting("lpips", loss, torch.tensor([0, 2]))
    assert out.tolist() == pytest.approx([2.0, 2.0 * math.exp(-2.0) + 2.0])
    assert weighting.curve()["lpips"] == pytest.approx([1.0, math.exp(-1), math.exp(-2), math.exp(-3)], rel=1e-6)
    assert weighting.curve()["pdino"] == [1.0] * 4


def test_learned_log_variance_moves_towards_the_log_of_the_loss_it_weights():
    """The optimum of L / exp(u) + u is u = log L: a bin with a loss of e^2 learns weight e^-2."""
    weighting = LearnedTimeWeighting(("lpips",), bins=2)
    opt = torch.optim.SGD(weighting.parameters(), lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        weighting("lpips", torch.tensor([math.exp(2.0), 1.0]), torch.tensor([0, 1])).sum().backward()
        opt.step()
    assert weighting.log_variance[0].tolist() == pytest.approx([2.0, 0.0], abs=1e-3)


def test_only_the_learned_schedule_builds_a_learned_weighting_and_only_for_terms_in_use():
    assert learned_weighting_for(loss_cfg()) is None
    built = learned_weighting_for(loss_cfg(gate_schedule="learned", pdino_weight=0.0, learned_weight_bins=6))
    assert built.terms == ("lpips",) and tuple(built.log_variance.shape) == (1, 6)


def test_the_report_draws_a_fixed_schedule_from_the_config_and_a_learned_one_from_the_last_logged_curve(tmp_path):
    import json

    import yaml

    from pixelgen.report import gate_curves, plot_gate_weights

    fixed, learned = tmp_path / "fixed", tmp_path / "learned"
    for run, loss in ((fixed, {"gate_schedule": "linear", "gate_start": 0.2, "gate_end": 0.6}),
                      (learned, {"gate_schedule": "learned", "learned_weight_bins": 2})):
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"loss": {**load_config()["loss"], **loss}}))
    records = [{"step": 10, "gate_weight/lpips/0": 1.0, "gate_weight/lpips/1": 1.0},
               {"step": 20, "gate_weight/lpips/0": 0.5, "gate_weight/lpips/1": 2.0}]
    (learned / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    t, w = gate_curves(fixed)[""]
    assert w[t.index(min(t, key=lambda v: abs(v - 0.4)))] == pytest.approx(0.5, abs=1e-6)
    assert gate_curves(learned) == {" lpips": ([0.25, 0.75], [0.5, 2.0])}
    out = plot_gate_weights({"variants": {"fixed": {}, "learned": {}}}, tmp_path, tmp_path / "gates.png")
    assert out.stat().st_size > 1000


# -- in the loss ----------------------------------------------------------------------------------------------

def make_criterion(**loss):
    from conftest import small_config
    from pixelgen.losses import PixelGenLoss

    cfg = small_config(loss=loss, encoders={"random_init": "true", "dino_model": "vit_small_patch14_dinov2"})
    return PixelGenLoss(cfg, 4, 4)


def perceptual_grad(criterion, gate, t, x, x_hat0, weighting=None):
    x_hat = x_hat0.clone().requires_grad_()
    _, lp, pd = criterion.perceptual(x_hat, x, t, index=gate.index)
    lpips_term, pdino_term = criterion.perceptual_terms(lp, pd, gate, len(t), weighting)
    (lpips_term + pdino_term).backward()
    return x_hat.grad.flatten(1)


@pytest.mark.parametrize("schedule", [{"gate_schedule": "linear", "gate_start": 0.2, "gate_end": 0.6},
                                      {"gate_schedule": "sigmoid", "gate": 0.4, "gate_width": 0.05},
                                      {"gate_schedule": "power", "gate": 0.2, "gate_power": 2.0}])
def test_a_continuous_gate_skips_zero_weight_samples_and_scales_the_gradient_by_the_weight(schedule):
    from pixelgen.losses import Gate, decide_gate

    criterion = make_criterion(pdino_gated="true", **schedule)
    t = torch.tensor([0.1, 0.3, 0.45, 0.9, 0.15, 0.5])
    weights = gate_weights(t, criterion.cfg)
    gate = decide_gate(t, criterion.cfg, torch.device("cpu"), None)
    assert gate.index.tolist() == [i for i in range(6) if weights[i] > 0] and 0 in weights.tolist()
    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    x_hat = x + 0.3 * torch.randn_like(x)
    weighted = perceptual_grad(criterion, gate, t, x, x_hat)
    unweighted = perceptual_grad(criterion, Gate(gate.index), t, x, x_hat)  # the same samples at weight 1
    for i in range(6):
        if weights[i] == 0:
            assert torch.all(weighted[i] == 0)
        else:
            assert unweighted[i].abs().sum() > 0
            torch.testing.assert_close(weighted[i], weights[i] * unweighted[i], rtol=1e-4, atol=1e-9)


def test_the_step_schedule_is_the_same_number_as_before_schedules_existed():
    from pixelgen.losses import decide_gate, gated_reduce

    criterion = make_criterion(gate=0.3, pdino_gated="true")
    t = torch.tensor([0.1, 0.3, 0.7, 0.2])
    gate = decide_gate(t, criterion.cfg, torch.device("cpu"), None)
    assert gate.weights is None and gate.index.tolist() == [1, 2]
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    _, lp, pd = criterion.perceptual(x.flip(0), x, t, index=gate.index)
    lpips_term, pdino_term = criterion.perceptual_terms(lp, pd, gate, 4, None)
    assert lpips_term.item() == (lp.sum() / 2).item() and pdino_term.item() == gated_reduce(pd, gate.index, 4,
                                                                                           "gated_mean").item()


def test_the_learned_weighting_sees_every_sample_and_trains_its_log_variances():
    from pixelgen.losses import decide_gate

    criterion = make_criterion(gate_schedule="learned", learned_weight_bins=4, pdino_gated="true")
    weighting = learned_weighting_for(criterion.cfg)
    t = torch.tensor([0.05, 0.3, 0.6, 0.95])
    gate = decide_gate(t, criterion.cfg, torch.device("cpu"), weighting)
    assert gate.index.tolist() == [0, 1, 2, 3] and gate.bins.tolist() == [0, 1, 2, 3]
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    x_hat = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    _, lp, pd = criterion.perceptual(x_hat, x, t, index=gate.index)
    lpips_term, pdino_term = criterion.perceptual_terms(lp, pd, gate, 4, weighting)
    (lpips_term + pdino_term).backward()
    assert torch.all(x_hat.grad.flatten(1).abs().sum(1) > 0)  # no sample is gated out
    # d/du (L e^-u + u) / B = (1 - L) / B at u = 0: the log-variances get exactly that gradient
    expected = torch.stack([(1 - lp.detach()) / 4, (1 - pd.detach()) / 4])
    torch.testing.assert_close(weighting.log_variance.grad, expected)


@pytest.mark.slow
def test_a_run_with_the_learned_weighting_trains_logs_and_resumes_bit_identically(tmp_path):
    import json

    from jobs_helpers import fast_config, make_shards, pixelgen

    shards = make_shards(tmp_path / "shards")
    config = fast_config(tmp_path / "config.yaml", shards, f"sqlite:///{tmp_path / 'mlflow.db'}")
    learned = ["--set", "loss.gate_schedule=learned", "--set", "loss.learned_weight_bins=3"]
    full = pixelgen("train", "--config", str(config), "--run-dir", str(tmp_path / "full"), "--quiet", *learned)
    assert full.returncode == 0, full.stderr[-2000:]
    stopped = pixelgen("train", "--config", str(config), "--run-dir", str(tmp_path / "resumed"), "--quiet",
                       "--stop-at-step", "3", *learned)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    resumed = pixelgen("train", "--config", str(config), "--run-dir", str(tmp_path / "resumed"), "--quiet", *learned)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "full/checkpoints/final.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "resumed/checkpoints/final.pt", weights_only=False)["model"]
    u = a["loss_weighting.log_variance"]
    assert u.shape[1] == 3 and not torch.equal(u, torch.zeros_like(u))  # trained, not left at 0
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(line) for line in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    assert {"gate_weight/lpips/0", "gate_weight/pdino/2"} <= logged[-1].keys()
    assert logged[-1]["gate_weight/lpips/0"] == pytest.approx(math.exp(-u[0, 0].item()), rel=1e-6)
