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
