import pytest
import torch

from pixelgen.model import JiT, SIZES, apply_rope, build_model, jit_config, rope_2d
from pixelgen.config import base_config
from pixelgen.errors import ConfigError

PAPER_PARAMS = {"B/16": 131e6, "L/16": 459e6, "XL/16": 676e6, "H/16": 953e6}


@pytest.mark.parametrize("size", list(PAPER_PARAMS))
def test_parameter_counts_match_the_paper(size):
    with torch.device("meta"):
        model = JiT(SIZES[size])
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PAPER_PARAMS[size]) / PAPER_PARAMS[size] < 0.03, f"{size}: {count / 1e6:.1f}M"


def test_paper_sizes_have_the_table_shapes():
    for size, (depth, width, heads, bottleneck) in {"B/16": (12, 768, 12, 128), "L/16": (24, 1024, 16, 128),
                                                    "XL/16": (28, 1152, 16, None), "H/16": (32, 1280, 16, 256)}.items():
        cfg = SIZES[size]
        assert (cfg.depth, cfg.width, cfg.heads, cfg.bottleneck, cfg.patch_size, cfg.in_context_len) == \
               (depth, width, heads, bottleneck, 16, 32)
    assert SIZES["XL/16"].proj_dropout == 0.1


def randomised(model):
    # adaLN-Zero starts every branch (and the head) at zero; perturb so outputs depend on the inputs
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def tiny(**kw):
    return randomised(JiT(jit_config("tiny", **kw)))


def test_starts_as_zero_prediction_thanks_to_adaln_zero():
    model = JiT(jit_config("tiny"))
    out = model(torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([0, 3]))
    assert out.shape == (2, 3, 32, 32) and out.abs().max() == 0


@pytest.mark.parametrize("image_size, patch_size", [(32, 4), (64, 8), (48, 16)])
def test_image_and_patch_size_are_parameters(image_size, patch_size):
    model = tiny(image_size=image_size, patch_size=patch_size)
    x = torch.randn(2, 3, image_size, image_size)
    out, feats = model(x, torch.rand(2), torch.tensor([1, 2]), feature_block=3)
    assert out.shape == x.shape
    assert feats.shape == (2, (image_size // patch_size) ** 2, model.cfg.width)


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="model.size"):
        jit_config("XXL/16")
    with pytest.raises(ConfigError, match="image_size"):
        jit_config("tiny", image_size=30, patch_size=4)


def test_build_model_from_config_section():
    cfg = base_config()["model"] | {"size": "tiny", "image_size": 16, "patch_size": 4, "num_classes": 7}
    model = build_model(cfg)
    assert model.cfg.grid == 4 and model.null_class == 7 and model.y_embed.num_embeddings == 8


def test_conditioning_on_time_and_class_and_null_class():
    model = tiny().eval()
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([0.4])
    base = model(x, t, torch.tensor([1]))
    assert not torch.allclose(base, model(x, torch.tensor([0.8]), torch.tensor([1])))
    assert not torch.allclose(base, model(x, t, torch.tensor([2])))
    null = model(x, t, torch.tensor([model.null_class]))
    assert null.shape == base.shape and not torch.allclose(base, null)


def test_in_context_class_tokens_are_prepended_from_the_middle_block():
    model = tiny().eval()
    seen = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0].detach().clone()))
    y = torch.tensor([1, 2])
    model(torch.randn(2, 3, 32, 32), torch.rand(2), y)
    n_img, n_ctx, start = model.cfg.grid ** 2, model.cfg.in_context_len, model.cfg.in_context_start
    for i, h in seen.items():
        assert h.shape[1] == (n_img + n_ctx if i >= start else n_img)
    expected = model.y_embed(y).unsqueeze(1) + model.in_context_pos
    assert torch.allclose(seen[start][:, :n_ctx], expected)


def test_rope_makes_attention_depend_on_relative_position_only():
    head_dim, grid = 16, 6
    cos, sin = rope_2d(head_dim, grid, prefix=0)
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(pos_q, pos_k):
        iq, ik = pos_q[0] * grid + pos_q[1], pos_k[0] * grid + pos_k[1]
        rq = apply_rope(q.view(1, 1, 1, -1).expand(1, 1, grid * grid, -1), cos, sin)[0, 0, iq]
        rk = apply_rope(k.view(1, 1, 1, -1).expand(1, 1, grid * grid, -1), cos, sin)[0, 0, ik]
        return (rq * rk).sum()

    assert torch.allclose(score((1, 2), (3, 1)), score((2, 3), (4, 2)), atol=1e-5)  # same offset (2, -1)
    assert not torch.allclose(score((1, 2), (3, 1)), score((1, 2), (1, 3)), atol=1e-3)
    # rotations preserve norms, and prefix (in-context) tokens are not rotated
    cos_p, sin_p = rope_2d(head_dim, grid, prefix=3)
    v = torch.randn(1, 1, 3 + grid * grid, head_dim)
    rotated = apply_rope(v, cos_p, sin_p)
    assert torch.allclose(rotated[..., :3, :], v[..., :3, :])
    assert torch.allclose(rotated.norm(dim=-1), v.norm(dim=-1), atol=1e-5)


def test_qk_norm_and_rmsnorm_are_used():
    model = tiny()
    names = {type(m).__name__ for m in model.modules()}
    assert {"RMSNorm", "SwiGLU", "Attention"} <= names and "LayerNorm" not in names
    assert hasattr(model.blocks[0].attn, "q_norm") and hasattr(model.blocks[0].attn, "k_norm")


def test_feature_block_returns_image_tokens_before_and_after_in_context_start():
    model = tiny().eval()
    x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([0, 1])
    start = model.cfg.in_context_start
    for k in (1, start, start + 1, model.cfg.depth):
        out, feats = model(x, t, y, feature_block=k)
        assert feats.shape == (2, model.cfg.grid ** 2, model.cfg.width)
        assert torch.allclose(out, model(x, t, y))


def test_gradients_reach_every_trainable_parameter():
    model = tiny()
    out, feats = model(torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([0, 1]), feature_block=2)
    (out.square().mean() + feats.square().mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_dropout_only_in_the_middle_blocks():
    model = JiT(jit_config("tiny", proj_dropout=0.1))
    rates = [b.attn.drop.p for b in model.blocks]
    depth = model.cfg.depth
    # the official bounds: depth // 4 <= i < depth // 4 * 3 (blocks 1, 2 of 6; depth * 3 // 4 would add block 3)
    assert rates == [0.0, 0.1, 0.1, 0.0, 0.0, 0.0]
    assert rates == [0.1 if depth // 4 <= i < depth // 4 * 3 else 0.0 for i in range(depth)]


@pytest.mark.slow
def test_works_under_torch_compile():
    model = tiny(image_size=16, patch_size=4).eval()
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 10])
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: fails on any graph break
    with torch.no_grad():
        assert torch.allclose(compiled(x, t, y), model(x, t, y), atol=1e-5)


def test_label_embedder_owns_the_null_class_and_guidance_dropout():
    from pixelgen.model import LabelEmbedder

    embedder = LabelEmbedder(num_classes=10, width=8, dropout_prob=0.5)
    assert embedder.null_class == 10 and embedder.num_embeddings == 11
    labels = torch.arange(10).repeat(200)
    dropped = embedder.drop(labels, torch.Generator().manual_seed(0))
    null = dropped == 10
    assert 0.4 < null.float().mean() < 0.6
    assert torch.equal(dropped[~null], labels[~null])  # the others are untouched
    # the same generator state drops the same labels (it is checkpointed for an exact resume)
    assert torch.equal(dropped, embedder.drop(labels, torch.Generator().manual_seed(0)))
    assert (LabelEmbedder(10, 8, dropout_prob=1.0).drop(labels, torch.Generator()) == 10).all()


def test_no_label_dropout_draws_nothing_from_the_generator():
    from pixelgen.model import LabelEmbedder

    generator = torch.Generator().manual_seed(3)
    labels = torch.tensor([1, 2, 3])
    assert LabelEmbedder(10, 8).drop(labels, generator) is labels
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(3).get_state())


def test_class_dropout_reaches_the_label_embedder_and_the_table_key_is_stable():
    from pixelgen.denoiser import build_denoiser

    cfg = base_config()
    cfg["model"] |= {"size": "tiny", "image_size": 16, "patch_size": 4, "num_classes": 7}
    net = build_denoiser(cfg, None, class_dropout=0.25).net
    assert net.y_embed.dropout_prob == 0.25 and net.null_class == 7
    assert build_model(cfg["model"]).y_embed.dropout_prob == 0.0  # sampling builds without dropout
    assert tuple(net.state_dict()["y_embed.weight"].shape) == (8, net.cfg.width)
