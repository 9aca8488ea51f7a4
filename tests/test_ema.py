import pytest
import torch
from torch import nn

from pixelgen.ema import EMA


def test_ema_update_follows_the_formula():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    before = ema.shadow.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.shadow.weight, 0.9 * before + 0.1 * model.weight)
    assert not any(p.requires_grad for p in ema.shadow.parameters())


def test_warmup_starts_fast_and_reaches_the_decay():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.9999, warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)
    ema.num_updates = 10 ** 7
    assert ema.current_decay() == 0.9999
    assert EMA(model, decay=0.5).current_decay() == 0.5


def test_state_dict_round_trip():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.99, warmup=True)
    with torch.no_grad():
        model.weight.mul_(2)
    ema.update(model)
    other = EMA(nn.Linear(2, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow.weight, ema.shadow.weight) and other.num_updates == 1 and other.warmup


def test_bad_decay():
    with pytest.raises(ValueError):
        EMA(nn.Linear(1, 1), decay=1.5)


class MixedModel(nn.Module):
    """Parameters of three dtypes, a buffer that changes in training (BatchNorm statistics) and a constant one."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(4, 3).to(torch.bfloat16)
        self.c = nn.Parameter(torch.randn(7, dtype=torch.float64))
        self.norm = nn.BatchNorm1d(4)
        self.register_buffer("table", torch.arange(6.0), persistent=False)


def reference_update(shadow: nn.Module, model: nn.Module, decay: float) -> None:
    """The update as written before the fused one: a lerp per parameter, then every buffer copied."""
    with torch.no_grad():
        for e, p in zip(shadow.parameters(), model.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1.0 - decay)
        for e, b in zip(shadow.buffers(), model.buffers()):
            e.copy_(b)


def perturb(model: nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model.norm(torch.randn(8, 4))  # moves the running statistics (train mode)


def test_fused_update_equals_the_per_parameter_formula_bit_for_bit_over_dtypes_and_buffers():
    torch.manual_seed(0)
    model = MixedModel()
    ema = EMA(model, decay=0.9, warmup=True)
    reference = EMA(model, decay=0.9, warmup=True).shadow
    for step in range(5):
        perturb(model, step)
        reference_update(reference, model, ema.current_decay())
        ema.update(model)
    for (name, mine), want in zip(ema.shadow.state_dict().items(), reference.state_dict().values()):
        assert mine.dtype == want.dtype and torch.equal(mine, want), name
    assert ema.shadow.norm.num_batches_tracked.item() == 5  # the persistent buffers follow the model


def test_a_shadow_of_another_dtype_is_updated_through_a_conversion():
    torch.manual_seed(0)
    model = MixedModel()
    ema = EMA(model, decay=0.5)
    reference = EMA(model, decay=0.5).shadow
    ema.shadow.double(), reference.double()
    perturb(model, 1)
    reference_update(reference, model, 0.5)
    ema.update(model)
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow.parameters(), reference.parameters()))
    assert ema.shadow.b.weight.dtype == torch.float64


def test_constant_buffers_are_copied_once_at_build_and_not_per_step():
    model = MixedModel()
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.table.add_(1.0)  # a derived constant (a RoPE table in JiT) is never touched in training
    ema.update(model)
    assert torch.equal(ema.shadow.table, torch.arange(6.0))
    assert len(ema._shadow_buffers) == 3  # running mean, running var, batch count: one foreach copy per step


def test_jit_has_no_buffer_to_copy_per_step():
    from pixelgen.model import build_model

    net = build_model({"size": "tiny", "image_size": 16, "patch_size": None, "num_classes": 4, "proj_dropout": None})
    assert list(net.buffers()) and EMA(net)._shadow_buffers == []
