"""The training step never waits for the device between log steps, and the encoders compile once for every
gated count (issue 13, training step)."""

import contextlib
from collections import Counter

import pytest
import torch

from jobs_helpers import fast_config, make_shards
from pixelgen import train
from pixelgen.config import load_config
from pixelgen.data import StreamLoader

# everything that copies a device value to the host (a sync on a GPU), or makes a shape from device data
TENSOR_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "nonzero",
                "masked_select", "unique", "cpu")
TORCH_READS = ("nonzero", "masked_select", "unique", "argwhere")


class SyncCounter:
    """Counts host reads per training step, from the start of a step to the start of the next (its log and
    save included); the data loader, which makes host tensors, is left out."""

    def __init__(self, monkeypatch):
        self.active, self.step, self.counts = False, 0, Counter()
        self.calls: dict[int, list[str]] = {}
        for name in TENSOR_READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), f"Tensor.{name}"))
        for name in TORCH_READS:
            monkeypatch.setattr(torch, name, self._wrap(getattr(torch, name), f"torch.{name}"))
        monkeypatch.setattr(torch.Tensor, "__getitem__", self._wrap_getitem(torch.Tensor.__getitem__))
        monkeypatch.setattr(torch.cuda, "synchronize", self._wrap(torch.cuda.synchronize, "cuda.synchronize"))

    def _count(self, what: str) -> None:
        if self.active:
            self.counts[self.step] += 1
            self.calls.setdefault(self.step, []).append(what)

    def _wrap(self, real, what):
        def counted(*args, **kwargs):
            self._count(what)
            with self.paused():  # one read counts once, not again for what it calls
                return real(*args, **kwargs)
        return counted

    def _wrap_getitem(self, real):
        def getitem(tensor, key):
            keys = key if isinstance(key, tuple) else (key,)
            if any(isinstance(k, torch.Tensor) and k.dtype == torch.bool for k in keys):
                self._count("boolean indexing")  # a data-dependent shape
            return real(tensor, key)
        return getitem

    @contextlib.contextmanager
    def paused(self):
        before, self.active = self.active, False
        try:
            yield
        finally:
            self.active = before

    def watch(self, monkeypatch) -> None:
        real_step = train.Trainer.train_step
        counter = self

        def train_step(trainer, images, labels):
            counter.step, counter.active = trainer.step + 1, True
            return real_step(trainer, images, labels)

        real_iter = StreamLoader.__iter__

        def loader_iter(loader):
            batches = real_iter(loader)
            while True:
                with counter.paused():
                    batch = next(batches, None)
                if batch is None:
                    return
                yield batch

        from pixelgen.losses import PixelGenLoss

        real_draw = PixelGenLoss.draw_times

        def draw_times(criterion, batch, device, generator, host_generator, weighting=None):
            # host work, left out: t comes from a CPU generator and the gate index stays on the host
            assert host_generator.device.type == "cpu"
            with counter.paused():
                t, gate = real_draw(criterion, batch, device, generator, host_generator, weighting)
            assert gate.index.device.type == "cpu"
            return t, gate

        monkeypatch.setattr(PixelGenLoss, "draw_times", draw_times)
        monkeypatch.setattr(train.Trainer, "train_step", train_step)
        monkeypatch.setattr(StreamLoader, "__iter__", loader_iter)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("sync"))


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_no_host_read_between_log_steps(tmp_path, shards, monkeypatch, grad_clip):
    path = fast_config(tmp_path / "config.yaml", shards, f"sqlite:///{tmp_path / 'mlflow.db'}",
                       train={"steps": 6, "log_every": 3, "ckpt_every": 1000, "grad_clip": grad_clip},
                       loss={"gate": 0.5})
    config = load_config(path)
    counter = SyncCounter(monkeypatch)
    counter.watch(monkeypatch)
    train.train(config, tmp_path / "run", progress=False)
    quiet = {step: counter.calls.get(step, []) for step in (1, 2, 4, 5)}
    assert all(not calls for calls in quiet.values()), quiet
    assert counter.counts[3] > 0  # the log step reads its numbers: the counter does see reads


def test_a_nan_is_caught_at_the_next_log_step_naming_the_step_it_began(tmp_path, shards, monkeypatch):
    from pixelgen import flow
    from pixelgen.errors import PixelgenError

    path = fast_config(tmp_path / "config.yaml", shards, f"sqlite:///{tmp_path / 'mlflow.db'}",
                       train={"steps": 8, "log_every": 4, "ckpt_every": 1000})
    calls, real = {"n": 0}, flow.velocity_loss

    def poisoned(v_hat, v):
        calls["n"] += 1
        return real(v_hat, v) * (float("nan") if calls["n"] == 5 else 1.0)

    monkeypatch.setattr(flow, "velocity_loss", poisoned)
    with pytest.raises(PixelgenError, match=r"non-finite loss found at log step 8 \(first at step 5\)"):
        train.train(load_config(path), tmp_path / "nan", progress=False)
    assert not (tmp_path / "nan/checkpoints/last.pt").exists()


def test_the_host_time_generator_is_checkpointed(tmp_path, shards):
    path = fast_config(tmp_path / "config.yaml", shards, f"sqlite:///{tmp_path / 'mlflow.db'}",
                       train={"steps": 2, "log_every": 1, "ckpt_every": 1})
    train.train(load_config(path), tmp_path / "run", progress=False)
    saved = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=False)
    fresh = torch.Generator().manual_seed(train.HOST_SEED_OFFSET + 1)  # seed 0, rank 0
    host = saved["rng"][0]["host_generator"] if isinstance(saved["rng"], list) else saved["rng"]["host_generator"]
    assert not torch.equal(host, fresh.get_state())  # two steps drew from it
    torch.randn(8, generator=fresh), torch.randn(8, generator=fresh)  # two steps of 8 times
    assert torch.equal(host, fresh.get_state())


@pytest.mark.slow
def test_encoders_compile_a_bounded_number_of_times_for_varying_gated_counts():
    from torch._dynamo.utils import counters

    from test_losses import make

    torch._dynamo.reset()
    counters.clear()
    model, criterion = make(loss={"gate": 0.3, "pdino_gated": "true"})
    criterion.compile_encoders(backend="aot_eager")
    host = torch.Generator().manual_seed(0)
    gated = set()
    for _ in range(10):
        out = criterion(model, torch.rand(16, 3, 16, 16) * 2 - 1, torch.randint(0, 10, (16,)), host_generator=host)
        gated.add(round(out.terms["gated_fraction"] * 16))
    assert len(gated) >= 5  # the gated count did vary
    compiled = counters["stats"]["unique_graphs"]
    # LPIPS, DINO on the clean batch, DINO on the gated predictions: one graph each (+1 spare for a count of 1)
    assert 0 < compiled <= 4, dict(counters["stats"])
