"""Released checkpoints: the name/shape map against the official parameter list, the import command, and
(when PIXELGEN_OFFICIAL_SRC points to a checkout of Zehong-Ma/PixelGen) forward parity with the official JiT."""

import importlib.util
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from jobs_helpers import pixelgen
from pixelgen.errors import PixelgenError
from pixelgen.model import SIZES, JiT
from pixelgen.official import (DERIVED, convert_state, ema_state, import_official, official_to_ours,
                               ours_to_official, release_format)

OFFICIAL_LIST = Path(__file__).parent / "data" / "official_jit_params.txt"


def official_params(size: str) -> dict[str, tuple[int, ...]]:
    rows = [line.split() for line in OFFICIAL_LIST.read_text().splitlines() if line and not line.startswith("#")]
    return {name: tuple(int(d) for d in shape.split("x")) for s, name, shape in rows if s == size}


@pytest.mark.parametrize("size", ["XL/16", "L/16"])
def test_every_official_parameter_maps_to_one_of_ours_with_its_shape(size):
    official = official_params(size)
    assert len(official) > 300
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in JiT(SIZES[size]).state_dict().items()}
    bottleneck = SIZES[size].bottleneck is not None
    mapped = {official_to_ours(k, bottleneck): shape for k, shape in official.items() if k not in DERIVED}
    assert mapped == ours  # a bijection, shapes included: nothing left over on either side
    assert all(ours_to_official(k) in official for k in ours)
    assert official["pos_embed"] == (1, SIZES[size].grid ** 2, SIZES[size].width)


def perturbed(net: JiT) -> JiT:
    """Random weights everywhere (the adaLN-Zero start would make every output 0 and hide mistakes)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


def test_import_round_trip_gives_the_same_model_and_official_sampler_settings(tmp_path):
    from pixelgen.sample_job import load_ema_model

    net = perturbed(JiT(SIZES["tiny"]))
    torch.save(release_format(net), tmp_path / "PixelGen_XL_80ep.ckpt")
    info = import_official(tmp_path / "PixelGen_XL_80ep.ckpt", tmp_path / "imported.pt")
    assert info["size"] == "tiny" and info["verified"] is False  # no recorded digest: not a verified release
    model, state = load_ema_model(tmp_path / "imported.pt")
    assert state["encoders_real"] is False and state["source"]["release"] == "pixelgen-xl-80ep"
    assert state["config"]["sampling"]["sampler"] == "heun" and state["config"]["sampling"]["shift"] == 2.0
    z, t, y = torch.randn(3, 3, 32, 32), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 4, 10])
    assert torch.equal(model(z, t, y), net(z, t, y))


def test_import_refuses_what_is_not_a_release(tmp_path):
    net = JiT(SIZES["tiny"])
    torch.save({"state_dict": {f"denoiser.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "a.ckpt")
    with pytest.raises(PixelgenError, match="ema_denoiser"):
        import_official(tmp_path / "a.ckpt", tmp_path / "out.pt")
    bad = release_format(net)
    bad["state_dict"]["ema_denoiser.pos_embed"] = bad["state_dict"]["ema_denoiser.pos_embed"].flip(1)
    torch.save(bad, tmp_path / "b.ckpt")
    with pytest.raises(PixelgenError, match="position embedding"):
        import_official(tmp_path / "b.ckpt", tmp_path / "out.pt")
    result = pixelgen("import-official", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "o.pt"))
    assert result.returncode != 0 and "weights fetch" in result.stderr and "Traceback" not in result.stderr


def test_import_command_applies_sampling_overrides(tmp_path):
    torch.save(release_format(JiT(SIZES["tiny"])), tmp_path / "PixelGen_XL_160ep.ckpt")
    result = pixelgen("import-official", str(tmp_path / "PixelGen_XL_160ep.ckpt"), "--out", str(tmp_path / "i.pt"),
                      "--set", "sampling.guidance=2.25")
    assert result.returncode == 0, result.stderr
    assert "NOT comparable" in result.stdout
    state = torch.load(tmp_path / "i.pt", weights_only=False)
    assert state["config"]["sampling"]["guidance"] == 2.25 and state["source"]["release"] == "pixelgen-xl-160ep"


# ---------------------------------------------------------------------------------------------------------------
# Forward parity with the official code (needs a checkout: PIXELGEN_OFFICIAL_SRC=/path/to/PixelGen)

OFFICIAL_SRC = os.environ.get("PIXELGEN_OFFICIAL_SRC")


def official_jit_module():
    pytest.importorskip("einops")
    path = Path(OFFICIAL_SRC) / "src" / "models" / "transformer" / "JiT.py"
    spec = importlib.util.spec_from_file_location("official_jit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not OFFICIAL_SRC, reason="set PIXELGEN_OFFICIAL_SRC to a checkout of Zehong-Ma/PixelGen")
@pytest.mark.parametrize("bottleneck", [32, None])
def test_forward_parity_with_the_official_jit(monkeypatch, bottleneck):
    import torch._dynamo

    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # its RoPE tables call .cuda()
    with torch._dynamo.config.patch(disable=True):  # the official blocks carry @torch.compile
        check_forward_parity(official_jit_module(), bottleneck)


def check_forward_parity(module, bottleneck):
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
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(4, 3, cfg.image_size, cfg.image_size, generator=gen)
    t = torch.tensor([0.0, 0.3, 0.7, 0.97])
    y = torch.tensor([0, 3, 9, cfg.num_classes])  # the null class too
    with torch.no_grad():
        expected = official(z, t, y)
        got = ours(z, t, y)
        diff = (expected - got).abs().max().item()
    print(f"forward parity (bottleneck={bottleneck}): max abs diff {diff:.2e}")
    assert expected.abs().mean() > 0.1 and diff <= 1e-5
    # and the REPA features: the official return_layer=k is our feature_block=k
    with torch.no_grad():
        _, f_official = official(z, t, y, return_layer=cfg.in_context_start + 1)
        _, f_ours = ours(z, t, y, feature_block=cfg.in_context_start + 1)
    assert (f_official - f_ours).abs().max().item() <= 1e-5


def test_releases_are_fetched_only_when_named_and_verified_by_the_recorded_digest(tmp_path):
    from pixelgen import weights
    from pixelgen.files import sha256

    assert set(weights.DEFAULT_KEYS) == {"vgg16", "dinov2-b", "inception"}  # no 2.7 GB surprise by default
    release = tmp_path / "PixelGen_XL_80ep.ckpt"
    torch.save(release_format(perturbed(JiT(SIZES["tiny"]))), release)
    assert weights.status("pixelgen-xl-80ep", tmp_path)[0] == "random"
    assert import_official(release, tmp_path / "a.pt")["verified"] is False
    # what `weights fetch` records after a download: the file now counts as the release
    (tmp_path / weights.SUMS_FILE).write_text(f"{sha256(release)}  {release.name}\n")
    assert weights.status("pixelgen-xl-80ep", tmp_path)[0] == "ok"
    assert import_official(release, tmp_path / "b.pt")["verified"] is True
    assert torch.load(tmp_path / "b.pt", weights_only=False)["encoders_real"] is True
    missing = pixelgen("weights", "check", "--dir", str(tmp_path / "none"), "--only", "adm-ref-imagenet256")
    assert missing.returncode == 1 and "missing" in missing.stdout
    with pytest.raises(PixelgenError, match="weights fetch --only adm-ref-imagenet256"):
        weights.weight_path("adm-ref-imagenet256", tmp_path / "none")
