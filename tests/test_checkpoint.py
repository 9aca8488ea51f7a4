import torch

from pixelgen import checkpoint
from pixelgen.checkpoint import CheckpointIO, Entry


def test_checkpoint_contents_are_declared_once_for_save_and_restore(tmp_path):
    source = {"weights": torch.arange(3.0), "step": 7, "seen": []}
    target = {"weights": torch.zeros(3), "step": 0, "seen": []}

    def declare(state):
        return CheckpointIO(
            Entry("weights", lambda: state["weights"].clone(), lambda w: state.__setitem__("weights", w)),
            Entry("step", lambda: state["step"], lambda s: state.__setitem__("step", s)),
            Entry("position", lambda: state["step"] * 10, lambda p: state["seen"].append(p), per_rank=True),
            Entry("note", lambda: "for readers only"),
        )

    # two ranks: each contributes its own per-rank state; a rank restores its own
    ranks = [{"position": 70}, {"position": 71}]
    saved = declare(source).state(declare(source).per_rank_states(lambda mine: ranks))
    assert saved == {"weights": saved["weights"], "step": 7, "position": [70, 71], "note": "for readers only"}
    checkpoint.save_atomic(saved, tmp_path / "c.pt")
    declare(target).restore(checkpoint.load(tmp_path / "c.pt"), rank=1)
    assert torch.equal(target["weights"], source["weights"]) and target["step"] == 7 and target["seen"] == [71]
    assert not list(tmp_path.glob(".*tmp*"))


def test_ema_only_keeps_what_sampling_reads():
    full = {"model": 1, "optimizer": 2, "rng": [3], "step": 5, "config": {"a": 1}, "encoders_real": True,
            "ema": {"shadow": {"w": torch.ones(1)}, "num_updates": 5, "decay": 0.9, "warmup": False}}
    assert checkpoint.ema_only(full) == {"ema": {"shadow": full["ema"]["shadow"]}, "step": 5, "config": {"a": 1},
                                         "encoders_real": True, "init_from": None}  # provenance travels along
