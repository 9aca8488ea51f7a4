"""The training stream: WebDataset shards -> shuffled, flipped (image in [-1, 1], label) batches, forever.

Determinism and resumption, the design in one paragraph. Every (rank, worker) pair owns a slot. In epoch e
the shard list is permuted with (seed, e) and slot s takes shards s, s + S, s + 2S, ... (S = ranks x workers),
so slots are disjoint and together cover the set; with fewer shards than slots it splits by sample instead.
Each slot shuffles raw (still encoded) samples through a buffer driven by its own seeded RNG, which also draws
the flips, and batches inside the worker. The DataLoader takes batches from workers round-robin, so batch j
comes from worker j % W (roles rotate on resume). The stream's position is therefore one number, the batches consumed; restoring it
makes each worker replay its RNG and skip its consumed batches *without decoding them*, and the resumed run
sees exactly the batches an uninterrupted run would have seen. The stream never ends (epochs roll over), so no
rank can run dry and hang a collective on uneven shards.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .errors import PixelgenError
from .shards import read_manifest


def _identity(x):
    return x


def _slot_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _raw_samples(paths: list[str]) -> Iterator[dict]:
    """Undecoded samples from tar shards, in order (webdataset does the tar reading and key grouping)."""
    import webdataset as wds

    dataset = wds.WebDataset(paths, shardshuffle=False, nodesplitter=_identity, workersplitter=_identity,
                             empty_check=False)
    yield from dataset


def decode_image(data: bytes, extension: str) -> torch.Tensor:
    """Stored image bytes -> (3, H, W) uint8. PIL decodes PNG/JPEG (measured 6x faster here than
    torchvision.io for small images); .npy holds the raw pixels and needs no decoding."""
    if extension == "npy":
        array = np.load(io.BytesIO(data), allow_pickle=False)
        return torch.from_numpy(array).permute(2, 0, 1)
    else:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            array = np.array(image.convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1)


def decode_npy_pixels(data: bytes, resolution: int) -> torch.Tensor:
    """Fast path for the .npy images that `pixelgen shard` writes (uint8, C order, R x R x 3): the pixels are
    the last R*R*3 bytes, so skip np.load's header parsing (a third of the reader's time at 64 px)."""
    size = resolution * resolution * 3
    if len(data) < size + 10 or data[:6] != b"\x93NUMPY":
        return decode_image(data, "npy")
    array = np.frombuffer(data, dtype=np.uint8, count=size, offset=len(data) - size)
    return torch.from_numpy(array.reshape(resolution, resolution, 3).copy()).permute(2, 0, 1)


class ShardStream(IterableDataset):
    """Batches of (images (B, 3, R, R) uint8, labels (B,) long) from a shard folder (StreamLoader scales them).

    rank/world_size: the DDP split. epochs=None streams forever; an int stops after that many epochs (tests,
    evaluation) and yields the last partial batch. skip_batches: the loader position to resume from (see
    `StreamLoader`). with_keys=True adds the sample keys as a third element (for checks and debugging).
    """

    def __init__(self, shard_dir: str | Path, batch_size: int, *, seed: int = 0, shuffle_buffer: int = 2000,
                 flip: bool = True, rank: int = 0, world_size: int = 1, epochs: int | None = None,
                 skip_batches: int = 0, with_keys: bool = False):
        super().__init__()
        self.shard_dir = Path(shard_dir)
        manifest = read_manifest(self.shard_dir)
        self.shards = [str(self.shard_dir / s["name"]) for s in manifest["shards"]]
        self.num_samples = manifest["num_samples"]
        self.num_classes = len(manifest["classes"])
        self.resolution = manifest["resolution"]
        self.image_key = {"png": "png", "jpeg": "jpg", "npy": "npy"}[manifest["image_format"]]
        if not 0 <= rank < world_size:
            raise PixelgenError(f"rank {rank} is outside world size {world_size}")
        self.batch_size, self.seed, self.shuffle_buffer, self.flip = batch_size, seed, shuffle_buffer, flip
        self.rank, self.world_size, self.epochs = rank, world_size, epochs
        self.skip_batches, self.with_keys = skip_batches, with_keys

    def _slot(self) -> tuple[int, int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # After n consumed batches the next one belongs to logical worker n % W, but a fresh DataLoader asks
        # its worker 0 first: rotate the roles so that worker 0 plays logical worker n % W, and so on.
        worker = (worker + self.skip_batches) % workers
        return self.rank * workers + worker, self.world_size * workers, worker

    def _epoch_samples(self, epoch: int, slot: int, slots: int) -> Iterator[dict]:
        order = np.random.RandomState(_slot_seed(self.seed, epoch, 7)).permutation(len(self.shards))
        shards = [self.shards[i] for i in order]
        if len(shards) >= slots:
            yield from _raw_samples(shards[slot::slots])
        else:  # fewer shards than slots: every slot reads all shards and keeps every S-th sample
            for i, sample in enumerate(_raw_samples(shards)):
                if i % slots == slot:
                    yield sample

    def _shuffled(self, slot: int, slots: int, rng: random.Random) -> Iterator[dict]:
        # a buffer larger than the slot's share of an epoch would only hold duplicates from later epochs
        capacity = max(1, min(self.shuffle_buffer, self.num_samples // slots))
        buffer: list[dict] = []
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            for sample in self._epoch_samples(epoch, slot, slots):
                if len(buffer) < capacity:
                    buffer.append(sample)
                    continue
                j = rng.randrange(len(buffer))
                buffer[j], sample = sample, buffer[j]
                yield sample
            epoch += 1
        rng.shuffle(buffer)  # finite streams drain the buffer at the end
        yield from buffer

    def _batches_to_skip(self, worker: int, workers: int) -> int:
        # global batch j came from worker j % workers: count the consumed ones that were this worker's
        n = self.skip_batches
        return 0 if n <= worker else (n - worker + workers - 1) // workers

    def __iter__(self):
        slot, slots, worker = self._slot()
        workers = slots // self.world_size
        rng = random.Random(_slot_seed(self.seed, slot, slots))
        skip = self._batches_to_skip(worker, workers)
        batch: list[tuple[dict, bool]] = []
        for sample in self._shuffled(slot, slots, rng):
            batch.append((sample, self.flip and rng.random() < 0.5))
            if len(batch) == self.batch_size:
                if skip > 0:
                    skip -= 1  # consumed before the restart: advance the RNG, never decode
                else:
                    yield self._collate(batch)
                batch = []
        if batch and skip == 0:
            yield self._collate(batch)

    def _collate(self, batch: list[tuple[dict, bool]]):
        images, labels, keys = [], [], []
        for sample, flip in batch:
            try:
                data = sample[self.image_key]
                if self.image_key == "npy":
                    image = decode_npy_pixels(data, self.resolution)
                else:
                    image = decode_image(data, self.image_key)
            except (KeyError, OSError, ValueError) as err:
                raise PixelgenError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no readable "
                                    f"{self.image_key} image ({err}); rebuild the shards with `pixelgen shard`")
            images.append(image.flip(-1) if flip else image)
            labels.append(int(sample["cls"]))
            keys.append(sample["__key__"])
        # uint8 across the process boundary: a quarter of the bytes of float32; StreamLoader scales to [-1, 1].
        # In a worker, stack straight into shared memory so the DataLoader need not copy the batch again.
        x = torch.empty((len(images), *images[0].shape), dtype=torch.uint8)
        if get_worker_info() is not None:
            x.share_memory_()
        torch.stack(images, out=x)
        y = torch.tensor(labels, dtype=torch.long)
        return (x, y, keys) if self.with_keys else (x, y)


class StreamLoader:
    """A DataLoader over a ShardStream that knows its position: `state_dict()` / `load_state_dict()`.

    Yields (images (B, 3, R, R) float32 in [-1, 1], labels (B,)) [+ keys]; with `device`, images arrive there.

    Restore before iterating. The position is only meaningful for the same shards, seed, batch size, worker
    count and world size; a mismatch is an error rather than a silently different data order.
    """

    def __init__(self, shard_dir: str | Path, batch_size: int, *, num_workers: int = 2, seed: int = 0,
                 shuffle_buffer: int = 2000, flip: bool = True, rank: int = 0, world_size: int = 1,
                 epochs: int | None = None, with_keys: bool = False, pin_memory: bool = False,
                 device: torch.device | str | None = None):
        self.kwargs = dict(shard_dir=shard_dir, batch_size=batch_size, seed=seed, shuffle_buffer=shuffle_buffer,
                           flip=flip, rank=rank, world_size=world_size, epochs=epochs, with_keys=with_keys)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.device = torch.device(device) if device is not None else None
        self.batches_consumed = 0
        self._iterator = None

    def _identity_of_order(self) -> dict:
        k = self.kwargs
        return {"seed": k["seed"], "batch_size": k["batch_size"], "num_workers": self.num_workers,
                "world_size": k["world_size"], "rank": k["rank"], "shuffle_buffer": k["shuffle_buffer"],
                "flip": k["flip"]}

    def state_dict(self) -> dict:
        return {"batches_consumed": self.batches_consumed, **self._identity_of_order()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._identity_of_order()
        different = sorted(k for k in mine if state.get(k) != mine[k])
        if different:
            raise PixelgenError(f"cannot resume the data stream exactly: {', '.join(different)} changed since the "
                                f"checkpoint ({ {k: state.get(k) for k in different} } -> { {k: mine[k] for k in different} })")
        self.batches_consumed = state["batches_consumed"]
        self._iterator = None

    def __iter__(self):
        dataset = ShardStream(**self.kwargs, skip_batches=self.batches_consumed)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            persistent_workers=False, prefetch_factor=4 if self.num_workers else None)
        for batch in loader:
            self.batches_consumed += 1
            images = batch[0]
            if self.device is not None:  # move the compact uint8 batch, then scale on the device
                images = images.to(self.device, non_blocking=True)
            images = images.float().div_(127.5).sub_(1.0)
            yield (images, *batch[1:])
