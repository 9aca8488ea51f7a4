"""Parity details found on a second reading of the official code (issue 20), and import-official's refusals.

- under bf16 autocast the residual stream is bf16 before the class tokens join, fp32 after (the official
  `x += self.pos_embed` on the patch embedding's bf16 output, then a cat with the fp32 class tokens);
- the imported releases sample as the official sampler does (bf16-mixed, compiled, noise from a CPU generator);
- the flow-matching target is (x - z_t) / max(1 - t, t_eps), as the official trainer computes it;
- `pixelgen import-official` refuses what is not a class-to-image release in one line.

The official-code checks run when PIXELGEN_OFFICIAL_SRC points at a checkout of Zehong-Ma/PixelGen.
"""

from dataclasses import replace

import pytest
import torch

from pixelgen import flow
from pixelgen.model import SIZES, JiT
from pixelgen.official import OFFICIAL_SAMPLING, convert_state, ema_state, import_official, release_format

from conftest import small_config
from test_official_import import OFFICIAL_SRC, official_jit_module, perturbed


# ---------------------------------------------------------------------------------------------------------------
# The residual stream's dtype under bf16 autocast


def block_inputs(net: JiT, *args) -> list[torch.Tensor]:
    """The residual stream as each block receives it, for one forward pass."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach().clone())) for b in net.blocks]
    try:
        net(*args)
    finally:
        for h in hooks:
            h.remove()
    return seen


def inputs(cfg, n=3):
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=gen)
    return z, torch.tensor([0.1, 0.5, 0.97])[:n], torch.tensor([0, 4, cfg.num_classes])[:n]


def test_bf16_autocast_stream_is_bf16_until_the_class_tokens_join_as_the_official_in_place_add():
    net = perturbed(JiT(SIZES["tiny"]))
    z, t, y = inputs(net.cfg)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        seen = block_inputs(net, z, t, y)
        # the official: x = x_embedder(x) (bf16 under autocast); x += pos_embed (fp32), in place: rounded once
        embedded = net.x_embed(z)
        expected = embedded.clone()
        expected += net.pos_embed
    start = net.cfg.in_context_start
    assert embedded.dtype == torch.bfloat16
    assert [s.dtype for s in seen] == [torch.bfloat16] * start + [torch.float32] * (net.cfg.depth - start)
    assert torch.equal(seen[0], expected)
    # without autocast nothing changes: fp32 throughout
    with torch.no_grad():
        assert {s.dtype for s in block_inputs(net, z, t, y)} == {torch.float32}


@pytest.mark.skipif(not OFFICIAL_SRC, reason="set PIXELGEN_OFFICIAL_SRC to a checkout of Zehong-Ma/PixelGen")
@pytest.mark.parametrize("bottleneck", [32, None])
def test_bf16_autocast_forward_equals_the_official_jit(monkeypatch, bottleneck):
    import torch._dynamo

    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # its RoPE tables call .cuda()
    module = official_jit_module()
    cfg = replace(SIZES["tiny"], bottleneck=bottleneck)
    torch.manual_seed(1)
    official = module.JiT(input_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.width,
                          depth=cfg.depth, num_heads=cfg.heads, num_classes=cfg.num_classes,
                          bottleneck_dim=bottleneck or 128, use_bottleneck=bottleneck is not None,
                          in_context_len=cfg.in_context_len, in_context_start=cfg.in_context_start)
    with torch.no_grad():
        for p in official.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    official.eval()
    ours = JiT(cfg).eval()
    ours.load_state_dict(convert_state(ema_state({"state_dict": {f"ema_denoiser.{k}": v for k, v in
                                                                  official.state_dict().items()}}), cfg))
    z, t, y = inputs(cfg)
    feature_block = cfg.in_context_start - 1  # REPA features from a block that still sees the bf16 stream
    with torch._dynamo.config.patch(disable=True), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, f_expected = official(z, t, y, return_layer=feature_block)
        got, f_got = ours(z, t, y, feature_block=feature_block)
    print(f"bf16 autocast forward parity (bottleneck={bottleneck}): max abs diff "
          f"{(expected.float() - got.float()).abs().max().item():.2e}")
    assert f_got.dtype == f_expected.dtype == torch.bfloat16 and torch.equal(f_got, f_expected)
    assert got.dtype == expected.dtype and torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------------------------
# The imported releases sample as the official sampler does


def test_imported_releases_sample_like_the_official_sampler(tmp_path):
    from pixelgen.sample_job import load_ema_model

    # Lightning `precision: bf16-mixed` around predict_step, `ema_denoiser.compile()` in configure_model, and
    # each image's noise drawn by its own CPU generator (ClassLabelRandomNDataset)
    assert {k: OFFICIAL_SAMPLING[k] for k in ("precision", "compile", "noise_device")} == \
        {"precision": "bf16", "compile": True, "noise_device": "cpu"}
    torch.save(release_format(JiT(SIZES["tiny"])), tmp_path / "PixelGen_XL_80ep.ckpt")
    import_official(tmp_path / "PixelGen_XL_80ep.ckpt", tmp_path / "imported.pt")
    _, state = load_ema_model(tmp_path / "imported.pt")
    sampling = state["config"]["sampling"]
    assert (sampling["precision"], sampling["compile"], sampling["noise_device"]) == ("bf16", True, "cpu")


def test_workflow_imported_variants_start_from_the_official_sampling_and_a_cpu_run_can_override_it():
    """The workflow's imported variants resolve their sampling here (workflow/rules/common.smk, IMPORTED branch);
    tests/test_workflow_official.py runs config/official.yaml on the CPU with sampling.compile=false."""
    from pixelgen.official import release_sampling

    sampling = release_sampling()
    assert {k: sampling[k] for k in OFFICIAL_SAMPLING} == OFFICIAL_SAMPLING
    cpu = release_sampling(None, ["sampling.steps=3", "sampling.compile=false", "sampling.guidance=2.25"])
    assert (cpu["precision"], cpu["compile"], cpu["steps"], cpu["guidance"]) == ("bf16", False, 3, 2.25)


# ---------------------------------------------------------------------------------------------------------------
# The flow-matching target


def test_velocity_target_is_the_official_clamped_one_above_1_minus_t_eps():
    x, eps = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    t = torch.tensor([0.5, 0.96, 0.999])
    z = flow.interpolate(x, eps, t)
    target = flow.velocity_target(x, z, t, 0.05)
    # the official trainer: v_t = (x - x_t) / (1 - t).clamp_min(t_eps)
    official = (x - z) / (1 - t.view(-1, 1, 1, 1)).clamp_min(0.05)
    assert torch.equal(target, official)
    assert torch.allclose(target[0], x[0] - eps[0], atol=1e-5)  # the same as x - eps below 1 - t_eps ...
    assert not torch.allclose(target[1:], x[1:] - eps[1:], atol=1e-2)  # ... and (1 - t) / t_eps of it above


def test_training_loss_of_the_exact_clean_image_is_zero_at_every_t():
    """With x_hat = x the official FM loss is 0 at every t; with the target x - eps it was not above 1 - t_eps."""
    from pixelgen.losses import PixelGenLoss

    cfg = small_config(flow={"P_mean": 3.0, "P_std": 1.0},  # most t above 1 - t_eps = 0.95, some below
                       loss={"repa_weight": 0, "lpips_weight": 0, "pdino_weight": 0})
    criterion = PixelGenLoss(cfg, model_grid=4, patch_size=4)
    x, y = torch.rand(16, 3, 16, 16) * 2 - 1, torch.zeros(16, dtype=torch.long)
    out = criterion(lambda z, t, y: (x, None), x, y, generator=torch.Generator().manual_seed(0))
    assert (out.t > 0.95).any() and (out.t < 0.95).any()
    assert out.read_terms()[0]["fm"] == 0.0


# ---------------------------------------------------------------------------------------------------------------
# import-official on what is not a class-to-image release: one line each


def run_import(tmp_path, content, capsys) -> str:
    from pixelgen.cli import main

    torch.save(content, tmp_path / "release.ckpt")
    code = main(["import-official", str(tmp_path / "release.ckpt"), "--out", str(tmp_path / "out.pt")])
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out.pt").exists()
    return err


def release(**changes) -> dict:
    checkpoint = release_format(JiT(SIZES["tiny"]))
    state = checkpoint["state_dict"]
    for name, value in changes.items():
        if value is None:
            del state[f"ema_denoiser.{name}"]
        else:
            state[f"ema_denoiser.{name}"] = value
    return checkpoint


def test_import_of_a_bare_tensor_names_what_the_file_holds(tmp_path, capsys):
    err = run_import(tmp_path, torch.zeros(3), capsys)
    assert "Tensor" in err and "PixelGen_XL_80ep.ckpt" in err


def test_import_of_a_release_missing_a_weight_names_it(tmp_path, capsys):
    err = run_import(tmp_path, release(**{"blocks.3.attn.qkv.weight": None}), capsys)
    assert "blocks.3.attn.qkv.weight" in err and "missing" in err
    err = run_import(tmp_path, release(**{"blocks.0.attn.q_norm.weight": None}), capsys)
    assert "blocks.0.attn.q_norm.weight" in err and "missing" in err


def test_import_of_a_weight_with_a_wrong_shape_names_it_and_both_shapes(tmp_path, capsys):
    err = run_import(tmp_path, release(**{"blocks.2.mlp.w3.weight": torch.zeros(128, 100)}), capsys)
    assert "blocks.2.mlp.w3.weight" in err and "128x100" in err
    err = run_import(tmp_path, release(pos_embed=torch.zeros(1, 10, 128)), capsys)
    assert "pos_embed" in err


def test_import_of_a_text_to_image_release_says_which_kinds_are_known(tmp_path, capsys):
    # a JiT_T2I release: text embedding and text refiner blocks instead of a class table
    t2i = release(**{"y_embedder.embedding_table.weight": None, "y_embedder.proj.weight": torch.zeros(128, 64),
                     "y_pos_embedding": torch.zeros(1, 100, 128),
                     "text_refine_blocks.0.attn.qkv.weight": torch.zeros(384, 128)})
    err = run_import(tmp_path, t2i, capsys)
    assert "text-to-image" in err and "class-to-image" in err
    err = run_import(tmp_path, release(**{"y_embedder.embedding_table.weight": None}), capsys)
    assert "y_embedder.embedding_table.weight" in err and "class-to-image" in err
