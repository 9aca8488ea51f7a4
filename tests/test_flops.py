"""The JiT FLOP formula (pixelgen.flops) against torch's FlopCounterMode, the encoders' measured FLOPs against a
real training step, and the GPU part detection behind MFU."""

from dataclasses import replace

import pytest
import torch
import torch.nn.attention

from conftest import small_config
from pixelgen.denoiser import Denoiser, build_denoiser
from pixelgen.flops import (PEAK_BF16_TFLOPS, block_tokens, counted, denoiser_flops, detect_part, device_peak,
                            encoder_flops, jit_flops)
from pixelgen.losses import PixelGenLoss
from pixelgen.model import SIZES, JiT

CONFIGS = {
    "tiny": SIZES["tiny"],
    "tiny, no in-context tokens": replace(SIZES["tiny"], in_context_len=0),
    "tiny, in-context from block 0": replace(SIZES["tiny"], in_context_start=0),
    "64 px, patch 8, no bottleneck": replace(SIZES["tiny"], image_size=64, patch_size=8, bottleneck=None),
    "B/16 at 256 px": SIZES["B/16"],
    "XL/16 at 256 px": SIZES["XL/16"],
}


def meta_inputs(batch: int, size: int):
    return (torch.empty(batch, 3, size, size, device="meta"), torch.empty(batch, device="meta"),
            torch.zeros(batch, dtype=torch.long, device="meta"))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_formula_equals_the_flop_counter_forward_and_training(name):
    # FlopCounterMode counts matmuls, convolutions and attention only: the formula's definition (exact equality)
    cfg = CONFIGS[name]
    with torch.device("meta"):  # no memory, no compute: B/16 and XL/16 take a second or two
        denoiser = Denoiser(JiT(cfg), repa_block=2, encoder_dim=768)
    z, t, y = meta_inputs(3, cfg.image_size)
    assert counted(lambda: denoiser.net(z, t, y)) == 3 * jit_flops(cfg).forward
    # forward + backward of the network and the REPA projector, as the training step takes it
    trained = counted(lambda: sum(out.sum() for out in denoiser(z, t, y)).backward())
    assert trained == 3 * denoiser_flops(denoiser).training


def test_in_context_tokens_and_modulation_are_counted_where_they_run():
    cfg = SIZES["B/16"]
    assert block_tokens(cfg) == [256] * 4 + [288] * 8  # 32 class tokens from block 4 on
    flops = jit_flops(cfg)
    # adaLN runs once per sample: 12 blocks x (768 -> 6 x 768) + the final layer's (768 -> 2 x 768)
    assert flops.modulation == 2 * 768 * 768 * (12 * 6 + 2)
    assert flops.attention == 4 * 768 * (4 * 256 ** 2 + 8 * 288 ** 2)
    without = jit_flops(replace(cfg, in_context_len=0))
    assert without.attention == 4 * 768 * 12 * 256 ** 2 and without.forward < flops.forward


@pytest.mark.parametrize("rescale", ["false", "true"])  # true: LPIPS runs at 128 px (32 px x 16 / patch 4)
def test_encoder_flops_and_formula_add_up_to_a_real_training_step(rescale):
    config = small_config(encoders={"dino_input_size": 28}, loss={"gate": 0.3, "lpips_rescale_to_p16": rescale})
    criterion = PixelGenLoss(config, model_grid=8, patch_size=4)
    denoiser = build_denoiser(config, criterion.repa_dim)
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    y = torch.arange(6) % 10
    outputs = []

    def step():
        out = criterion(denoiser, x, y, generator=torch.Generator().manual_seed(3))
        out.total.backward()
        outputs.append(out)

    # FlopCounterMode has no formula for CPU's fused attention kernel (it would count 0): the math backend runs
    # attention as the matmuls it counts, as the meta device does
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        total = counted(step)
    gated = round(outputs[0].terms["gated_fraction"] * 6)
    assert 0 < gated < 6  # both the gated and the ungated paths are in this step
    enc = encoder_flops(criterion, 32)
    assert enc.dino_clean > 0 and enc.pdino_prediction > enc.dino_clean and enc.lpips > 0
    # pdino_gated is false: P-DINO runs on the whole batch once any sample is gated
    assert total == 6 * denoiser_flops(denoiser).training + enc.per_step(6, gated, pdino_rows=6)


@pytest.mark.parametrize("name, sm_count, part", [
    ("NVIDIA H100 80GB HBM3", 132, "H100 SXM"),
    ("NVIDIA H100 PCIe", 114, "H100 PCIe"),
    ("NVIDIA H100 NVL", 132, "H100 NVL"),
    ("NVIDIA H100", 114, "H100 PCIe"),
    ("NVIDIA H100", 132, "H100 SXM"),
    ("NVIDIA H100", None, None),
    ("NVIDIA H200", 132, "H200"),
    ("NVIDIA H200 NVL", 132, "H200 NVL"),
    ("NVIDIA A100-SXM4-80GB", 108, "A100"),
    ("NVIDIA A100-PCIE-40GB", 108, "A100"),
    ("NVIDIA GeForce RTX 4090", 128, None),
    ("Tesla V100-SXM2-16GB", 80, None),
])
def test_part_detection_from_the_device_name(name, sm_count, part):
    assert detect_part(name, sm_count) == part


def test_peaks_are_the_dense_bf16_figures_and_cpu_has_none():
    assert PEAK_BF16_TFLOPS["H100 SXM"] == 989.4 and PEAK_BF16_TFLOPS["H100 PCIe"] == 756.0
    assert PEAK_BF16_TFLOPS["H100 NVL"] == 835.0 and PEAK_BF16_TFLOPS["A100"] == 312.0
    assert device_peak(torch.device("cpu")) == ("CPU", None, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_formula_equals_the_counter_on_the_cuda_kernels():
    # on CUDA, attention runs as a fused kernel (flash / memory-efficient) that FlopCounterMode has formulas for
    device = torch.device("cuda")
    cfg = SIZES["B/16"]
    denoiser = Denoiser(JiT(cfg), repa_block=8, encoder_dim=768).to(device)
    z = torch.randn(2, 3, 256, 256, device=device)
    t, y = torch.rand(2, device=device), torch.randint(0, 1000, (2,), device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        trained = counted(lambda: sum(out.float().sum() for out in denoiser(z, t, y)).backward())
    assert trained == 2 * denoiser_flops(denoiser).training
    name, part, peak = device_peak(device)
    if any(known in name for known in ("H100", "H200", "A100")):
        assert part in PEAK_BF16_TFLOPS and peak == PEAK_BF16_TFLOPS[part] * 1e12
