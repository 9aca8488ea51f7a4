import pytest
import torch

from pixelgen import flow
from pixelgen.denoiser import Denoiser, repa_block_for
from pixelgen.losses import PixelGenLoss, gated_reduce
from pixelgen.model import JiT, jit_config

from conftest import small_config

FAST_ENCODERS = {"random_init": "true", "dino_model": "vit_small_patch14_dinov2"}


def make(loss=None, flow=None, encoders=None, image_size=16, patch_size=4):
    cfg = small_config(loss=loss or {}, flow=flow or {}, encoders={**FAST_ENCODERS, **(encoders or {})})
    net = JiT(jit_config("tiny", image_size=image_size, patch_size=patch_size))
    with torch.no_grad():  # move off the adaLN-Zero start so every path carries signal
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    criterion = PixelGenLoss(cfg, net.cfg.grid, net.cfg.patch_size)
    model = Denoiser(net, repa_block_for(net.cfg.depth, cfg["loss"]["repa_block"]), criterion.repa_dim)
    return model, criterion


def count_calls(module):
    sizes = []
    module.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    return sizes


def test_perceptual_gradient_is_exactly_zero_below_the_gate_and_nonzero_above():
    _, criterion = make(loss={"gate": 0.3, "pdino_gated": "true"})
    t = torch.tensor([0.1, 0.3, 0.31, 0.5, 0.2, 0.9])
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    x_hat = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    index, lp, pd = criterion.perceptual(x_hat, x, t)
    assert index.tolist() == [1, 2, 3, 5]  # t >= gate, as the official mask: 0.3 itself is gated in
    (lp.sum() + pd.sum()).backward()
    per_sample = x_hat.grad.abs().flatten(1).sum(1)
    assert torch.all(per_sample[t < 0.3] == 0)
    assert torch.all(per_sample[t >= 0.3] > 0)


def test_official_broadcast_bug_is_real_and_cannot_happen_here():
    B, N = 4, 9
    pred = torch.randn(B, N, 8, requires_grad=True)
    target = torch.randn(B, N, 8)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    # The official code: (B, N) cosine times a (B, 1, 1) mask broadcasts to (B, B, N) ...
    cos = torch.nn.functional.cosine_similarity(pred, target, dim=-1)
    broadcast = cos * mask.reshape(B, 1, 1)
    assert broadcast.shape == (B, B, N)
    loss = 1 - broadcast.mean(dim=(1, 2)).sum() / mask.sum()
    loss.backward()
    # ... so the samples the gate should have removed still get gradient: no gating at all
    assert (pred.grad[1].abs().sum() > 0) and (pred.grad[3].abs().sum() > 0)
    # Here gating selects samples and the reduction refuses anything but one value per gated sample
    index = torch.tensor([0, 2])
    with pytest.raises(ValueError, match="one value per gated sample"):
        gated_reduce(cos[index], index, B, "gated_mean")
    with pytest.raises(ValueError):
        gated_reduce(cos.mean(1), index, B, "gated_mean")  # (B,) values for G = 2 gated samples
    assert gated_reduce(cos[index].mean(1), index, B, "gated_mean").dim() == 0


def test_encoders_see_only_the_gated_samples():
    model, criterion = make(loss={"gate": 0.3, "pdino_gated": "true"})
    lpips_sizes, dino_sizes = count_calls(criterion.lpips.net), count_calls(criterion.dino)
    gen = torch.Generator().manual_seed(3)
    out = criterion(model, torch.rand(16, 3, 16, 16) * 2 - 1, torch.randint(0, 10, (16,)), generator=gen)
    gated = int((out.t >= 0.3).sum())
    assert 0 < gated < 16 and out.terms["gated_fraction"] == gated / 16
    assert lpips_sizes == [gated]
    # DINO: once on the clean batch (REPA target, reused for P-DINO), once on the gated predictions
    assert sorted(dino_sizes) == sorted([16, gated])


def test_no_perceptual_encoder_runs_when_no_sample_passes_the_gate():
    # REPA off and every t near 0: neither encoder may run at all
    model, criterion = make(loss={"gate": 0.3, "repa_weight": 0.0}, flow={"P_mean": -12.0, "P_std": 0.1})
    lpips_sizes, dino_sizes = count_calls(criterion.lpips.net), count_calls(criterion.dino)
    out = criterion(model, torch.rand(8, 3, 16, 16) * 2 - 1, torch.randint(0, 10, (8,)))
    assert lpips_sizes == [] and dino_sizes == []
    assert out.terms["lpips"] == 0 and out.terms["pdino"] == 0 and out.terms["gated_fraction"] == 0
    out.total.backward()  # still a valid graph through the flow-matching term


def test_gate_zero_applies_perceptual_losses_to_every_sample():
    model, criterion = make(loss={"gate": 0.0})
    lpips_sizes = count_calls(criterion.lpips.net)
    out = criterion(model, torch.rand(8, 3, 16, 16) * 2 - 1, torch.randint(0, 10, (8,)))
    assert lpips_sizes == [8] and out.terms["gated_fraction"] == 1.0


def test_total_is_the_weighted_sum_of_the_terms():
    model, criterion = make(loss={"lpips_weight": 0.3, "pdino_weight": 0.2, "repa_weight": 0.7})
    out = criterion(model, torch.rand(8, 3, 16, 16) * 2 - 1, torch.randint(0, 10, (8,)),
                    generator=torch.Generator().manual_seed(1))
    terms = out.read_terms()[0]
    expected = terms["fm"] + 0.7 * terms["repa"] + 0.3 * terms["lpips"] + 0.2 * terms["pdino"]
    assert terms["loss"] == pytest.approx(expected, rel=1e-5)
    assert all(terms[k] > 0 for k in ("fm", "repa", "lpips", "pdino"))


def test_reductions_differ_by_the_gated_fraction():
    model, criterion = make(loss={"pdino_gated": "true"})
    outs = {}
    for reduction in ("gated_mean", "batch_mean"):
        criterion.cfg["perceptual_reduction"] = reduction
        outs[reduction] = criterion(model, torch.ones(8, 3, 16, 16) * 0.5, torch.zeros(8, dtype=torch.long),
                                    generator=torch.Generator().manual_seed(5)).read_terms()[0]
    frac = outs["gated_mean"]["gated_fraction"]
    assert 0 < frac < 1
    assert outs["batch_mean"]["lpips"] == pytest.approx(outs["gated_mean"]["lpips"] * frac, rel=1e-4)
    assert outs["batch_mean"]["pdino"] == pytest.approx(outs["gated_mean"]["pdino"] * frac, rel=1e-4)


def test_backward_reaches_model_and_projector_but_not_encoders():
    model, criterion = make()
    out = criterion(model, torch.rand(8, 3, 16, 16) * 2 - 1, torch.randint(0, 10, (8,)))
    out.total.backward()
    assert all(p.grad is not None for p in model.projector.parameters())
    assert model.net.x_embed.proj[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in criterion.lpips.parameters())
    assert all(p.grad is None for p in criterion.dino.parameters())
    assert criterion.encoders_real is False
    assert {k for k in model.state_dict() if k.startswith("projector.")} == {
        f"projector.{k}" for k in model.projector.state_dict()}


def test_repa_works_when_dino_and_model_grids_differ():
    model, criterion = make(encoders={"dino_input_size": 84})  # DINO grid 6x6 vs model grid 4x4
    out = criterion(model, torch.rand(4, 3, 16, 16) * 2 - 1, torch.randint(0, 10, (4,)))
    assert 0 < out.terms["repa"] < 2


def test_zero_weights_build_no_encoders():
    model, criterion = make(loss={"lpips_weight": 0.0, "pdino_weight": 0.0, "repa_weight": 0.0})
    assert criterion.lpips is None and criterion.dino is None and model.projector is None


def test_repa_block_default_and_bounds():
    assert repa_block_for(24, None) == 8 and repa_block_for(28, None) == 8 and repa_block_for(12, None) == 4
    assert repa_block_for(6, None) == 2
    from pixelgen.errors import ConfigError

    with pytest.raises(ConfigError, match="repa_block"):
        repa_block_for(6, 9)


def test_pdino_ungated_by_default_runs_on_the_whole_batch_as_the_official_code():
    # the official (B, N) x (B, 1, 1) mask averages P-DINO over every sample once any is gated: reproduced here
    model, criterion = make(loss={"gate": 0.3, "repa_weight": 0.0})
    assert criterion.cfg["pdino_gated"] is False
    t = torch.tensor([0.1, 0.5, 0.2, 0.9])
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    x_hat = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    index, lp, pd = criterion.perceptual(x_hat, x, t)
    assert index.tolist() == [1, 3] and lp.shape == (2,) and pd.shape == (4,)
    pd.mean().backward()
    assert torch.all(x_hat.grad.abs().flatten(1).sum(1) > 0)  # every sample, the noisy ones included
    # the official expression gives the same number: mean of the cosine over the whole batch
    with torch.no_grad():
        pred = criterion.dino(x_hat, [12])[0]
        clean = criterion.dino(x, [12])[0]
        cos = torch.nn.functional.cosine_similarity(pred, clean, dim=-1)
        mask = (t >= 0.3).float().reshape(4, 1, 1)
        official = 1 - (cos * mask).mean(dim=(1, 2)).sum() / mask.sum()
    assert pd.mean().item() == pytest.approx(official.item(), rel=1e-5)
    # no gated sample: no P-DINO at all (the official term is then the constant 1, with no gradient)
    index, lp, pd = criterion.perceptual(x_hat, x, torch.full((4,), 0.1))
    assert index.numel() == 0 and pd.numel() == 0


def test_adaptive_perceptual_weight_follows_the_gradient_ratio_from_its_start_step():
    model, criterion = make(loss={"adaptive_weight_start": 100, "adaptive_weight_every": 50, "gate": 0.0})
    x, y = torch.rand(4, 3, 16, 16) * 2 - 1, torch.randint(0, 10, (4,))
    last = model.last_layer
    for step in (0, 99, 120):  # before the start, and a step that is not a multiple of `every`
        out = criterion(model, x, y, generator=torch.Generator().manual_seed(0), step=step, last_layer=last)
        assert out.read_terms()[0]["perceptual_weight"] == 1.0
    out = criterion(model, x, y, generator=torch.Generator().manual_seed(0), step=150, last_layer=last)
    terms = out.read_terms()[0]
    # recompute the official formula for the same draw
    gen = torch.Generator().manual_seed(0)
    from pixelgen import flow
    t = flow.sample_t(4, -0.8, 0.8, generator=gen)
    eps = torch.randn(x.shape, generator=gen)
    z = flow.interpolate(x, eps, t)
    x_hat, _ = model(z, t, y)
    fm = flow.velocity_loss(flow.x_to_v(x_hat, z, t, 0.05), flow.velocity_target(x, z, t, 0.05)).mean()
    _, lp, pd = criterion.perceptual(x_hat, x, t)
    percept = 0.1 * lp.mean() + 0.01 * pd.mean()
    g_fm = torch.autograd.grad(fm, last, retain_graph=True)[0]
    g_pc = torch.autograd.grad(percept, last)[0]
    w = float((g_fm.norm() / (g_pc.norm() + 1e-4)).clamp(0, 100))
    assert terms["perceptual_weight"] == pytest.approx(0.8 * 1.0 + 0.2 * w, rel=1e-4)
    assert terms["loss"] == pytest.approx(terms["fm"] + 0.5 * terms["repa"] + terms["perceptual_weight"]
                                          * (0.1 * terms["lpips"] + 0.01 * terms["pdino"]), rel=1e-5)


def test_the_gate_index_is_computed_on_the_host_from_host_times():
    # the trainer's times come from a CPU generator: the gate index must come from those times, no device read
    model, criterion = make(loss={"gate": 0.5, "pdino_gated": "true"})
    host = torch.Generator().manual_seed(7)
    t, gate = criterion.draw_times(16, torch.device("cpu"), None, host)
    index = gate.index
    expected = flow.sample_t(16, -0.8, 0.8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(t, expected) and index.device.type == "cpu"
    assert index.tolist() == [i for i in range(16) if expected[i] >= 0.5]


def test_read_terms_reads_every_tensor_term_at_once():
    model, criterion = make()
    out = criterion(model, torch.rand(4, 3, 16, 16) * 2 - 1, torch.randint(0, 10, (4,)))
    assert isinstance(out.terms["fm"], torch.Tensor)  # kept on the device until a log step reads it
    terms, (extra,) = out.read_terms(torch.tensor(3.5))
    assert terms["fm"] == out.terms["fm"].item() and extra == 3.5 and isinstance(terms["gated_fraction"], float)


def run_adaptive_updates(weight, gradients):
    """Real updates of `weight` from (FM gradient, perceptual gradient) pairs at a stand-in output layer."""
    layer = torch.zeros(8, requires_grad=True)
    for g_rec, g_per in gradients:
        weight.update((layer * g_rec).sum(), (layer * g_per).sum(), layer)
    return weight


def test_a_restored_adaptive_weight_continues_bit_identically():
    from pixelgen.losses import AdaptivePerceptualWeight

    gen = torch.Generator().manual_seed(3)
    gradients = [(torch.randn(8, generator=gen), torch.randn(8, generator=gen) * 0.1) for _ in range(40)]
    uninterrupted = [run_adaptive_updates(AdaptivePerceptualWeight(1, 1), gradients[:n]).value for n in range(41)]
    # a resume after any update; compared one update later, as the running average's contraction can absorb a
    # last-bit difference over later updates (a rounding difference shows in about 1 resume in 10)
    for stop in range(1, 40):
        resumed = AdaptivePerceptualWeight(1, 1)
        resumed.value = uninterrupted[stop]  # what the checkpoint saves and restores
        assert run_adaptive_updates(resumed, gradients[stop:stop + 1]).value == uninterrupted[stop + 1], stop
