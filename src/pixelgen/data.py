"""The training stream: WebDataset shards -> shuffled, flipped (image in [-1, 1], label) batches, forever.

Determinism and resumption, the design in one paragraph. Each rank's data is V virtual streams (V depends only
on the shard count and the world size, never on the worker count). In epoch e the shard list is permuted with
(seed, e) and stream s of the S = ranks x V takes shards s, s + S, ... (with fewer shards than streams, every
stream reads all shards and keeps every S-th sample). Each stream shuffles raw (still encoded) samples through
a buffer driven by its own seeded RNG, which also draws the flips, and cuts batches. Global batch b of a rank is
batch b // V of its stream b % V: the order is a function of the data and the seed alone. Worker w of W makes
the batches b = w, w + W, ... (running the streams those come from), and the DataLoader takes batches from
workers round-robin, so the loader yields them in order b = 0, 1, 2, ... The stream's position is therefore one
number, the batches consumed; restoring it makes each worker replay its streams' RNGs and skip consumed batches
*without decoding them*, so a resumed run sees exactly the batches an uninterrupted run would have seen, with
any worker count and wherever the shards now lie. The stream never ends (epochs roll over), so no rank can run
dry and hang a collective on uneven shards; an epoch that yields nothing is an error, not a busy loop.
"""

from __future__ import annotations

import functools
import io
import itertools
import math
import os
import random
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .errors import PixelgenError
from .files import sha256
from .shards import die_with_parent, read_manifest, verify_shards

# virtual streams per rank, at most: divisible by the usual worker counts (1, 2, 3, 4, 6, 8, 12, 24), so each
# worker runs only its own streams; with another count, workers share streams and skip each other's batches
MAX_STREAMS = 24
STREAM_CHOICES = (24, 12, 8, 6, 4, 3, 2, 1)
# 2: the worker-count-independent order above (1, unrecorded: one stream per worker)
ORDER_VERSION = 2


def _identity(x):
    return x


def _slot_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _raw_samples(paths: list[str], expected: dict[str, int]) -> Iterator[dict]:
    """Undecoded samples from tar shards, in order (webdataset does the tar reading and key grouping). Each
    shard read to its end must have yielded the count its manifest entry says: a truncated tar is an error
    naming it, never a silently smaller epoch."""
    import webdataset as wds

    for path in paths:
        count = 0
        try:
            for sample in wds.WebDataset([path], shardshuffle=False, nodesplitter=_identity,
                                         workersplitter=_identity, empty_check=False):
                count += 1
                yield sample
        except PixelgenError:
            raise
        except Exception as err:  # tarfile / webdataset errors on a damaged file
            reason = f"{type(err).__name__}: {err}".splitlines()[0][:200]
            raise PixelgenError(f"shard {path} is unreadable after {count} samples ({reason}); check the folder "
                                f"with `pixelgen shard --verify` and copy or rebuild the shard") from None
        if count != expected[path]:
            raise PixelgenError(f"shard {path} yielded {count} samples but the manifest says {expected[path]}: "
                                f"the file is truncated or corrupt; check the folder with `pixelgen shard "
                                f"--verify` and copy or rebuild the shard")


def manifest_digest(shard_dir: Path) -> str:
    """The data's identity: the manifest's sha256 (it holds every shard's sha256), whatever folder it is in."""
    return sha256(Path(shard_dir) / "manifest.json")


def check_num_classes(classes: int, num_classes: int, shard_dir: Path) -> None:
    """model.num_classes must equal the shards' class count `classes`: more classes in the data would feed class
    `num_classes` in as the null class (or index past the table), fewer would leave labels never trained."""
    if classes != num_classes:
        raise PixelgenError(f"model.num_classes is {num_classes} but the shards in {shard_dir} have {classes} "
                            f"classes: set model.num_classes={classes} (or shard the data set you meant)")


def _one_line(err: PixelgenError) -> PixelgenError:
    """An error raised in a DataLoader worker arrives as 'Caught PixelgenError in DataLoader worker process
    N. Original Traceback ...': keep the message the worker raised."""
    text = str(err)
    marker = "PixelgenError: "
    if text.startswith("Caught") and marker in text:
        return PixelgenError(text.rsplit(marker, 1)[1].strip().splitlines()[0], exit_code=err.exit_code)
    return err


def streams_per_rank(num_shards: int, world_size: int) -> int:
    """The number of virtual streams per rank: as many as the shards allow whole shards for (up to
    MAX_STREAMS), so small sets are not read many times over; it depends on the data and world size only."""
    for streams in STREAM_CHOICES:
        if streams * world_size <= num_shards:
            return streams
    return 1


def _worker_dies_with_parent(parent_pid: int, worker_id: int) -> None:
    """DataLoader worker_init_fn: a worker must not outlive the training process (see `die_with_parent`); the
    stream also checks the parent's pid as it runs."""
    die_with_parent(parent_pid)


def _parent_gone(parent_pid: int | None) -> bool:
    return parent_pid is not None and os.getppid() != parent_pid


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
                 skip_batches: int = 0, with_keys: bool = False, verify: bool = True):
        super().__init__()
        self.shard_dir = Path(shard_dir)
        manifest = read_manifest(self.shard_dir)
        # presence and counts always; digests by default (once per process and folder state: see verify_shards)
        verify_shards(self.shard_dir, digests=verify, manifest=manifest)
        self.manifest_sha256 = manifest_digest(self.shard_dir)
        # shards without samples (all their files rejected) would only leave a stream empty for an epoch
        usable = [s for s in manifest["shards"] if s["samples"] > 0]
        self.shards = [str(self.shard_dir / s["name"]) for s in usable]
        self.expected_counts = {str(self.shard_dir / s["name"]): s["samples"] for s in usable}
        self.streams = streams_per_rank(len(self.shards), world_size)
        self.parent_pid = None  # set by StreamLoader when workers run the stream: they stop if it dies
        self.num_samples = manifest["num_samples"]
        if self.num_samples == 0:
            raise PixelgenError(f"{self.shard_dir} holds no images (all files were rejected, see its "
                                f"manifest.json); fix the source images and run `pixelgen shard` again")
        self.num_classes = len(manifest["classes"])
        self.resolution = manifest["resolution"]
        self.image_key = {"png": "png", "jpeg": "jpg", "npy": "npy"}[manifest["image_format"]]
        if not 0 <= rank < world_size:
            raise PixelgenError(f"rank {rank} is outside world size {world_size}")
        self.batch_size, self.seed, self.shuffle_buffer, self.flip = batch_size, seed, shuffle_buffer, flip
        self.rank, self.world_size, self.epochs = rank, world_size, epochs
        self.skip_batches, self.with_keys = skip_batches, with_keys

    def _epoch_samples(self, epoch: int, slot: int, slots: int) -> Iterator[dict]:
        order = np.random.RandomState(_slot_seed(self.seed, epoch, 7)).permutation(len(self.shards))
        shards = [self.shards[i] for i in order]
        if len(shards) >= slots:
            yield from _raw_samples(shards[slot::slots], self.expected_counts)
        else:  # fewer shards than slots: every slot reads all shards and keeps every S-th sample
            for i, sample in enumerate(_raw_samples(shards, self.expected_counts)):
                if i % slots == slot:
                    yield sample

    def _shuffled(self, slot: int, slots: int, rng: random.Random) -> Iterator[dict]:
        # shuffle_buffer is per rank, shared by its streams; a buffer larger than the stream's share of an
        # epoch would only hold duplicates from later epochs
        capacity = max(1, min(math.ceil(self.shuffle_buffer / self.streams), self.num_samples // slots))
        buffer: list[dict] = []
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            seen = 0
            for sample in self._epoch_samples(epoch, slot, slots):
                seen += 1
                if seen % 256 == 0 and _parent_gone(self.parent_pid):
                    os._exit(1)  # an orphaned worker: nobody reads its batches
                if len(buffer) < capacity:
                    buffer.append(sample)
                    continue
                j = rng.randrange(len(buffer))
                buffer[j], sample = sample, buffer[j]
                yield sample
            if seen == 0:  # without this an empty epoch is a busy loop that never yields (or stops)
                raise PixelgenError(f"data stream {slot} of {slots} got no samples from {self.shard_dir} "
                                    f"({self.num_samples} samples in {len(self.shards)} usable shards): use a "
                                    f"larger data set or fewer ranks")
            epoch += 1
        rng.shuffle(buffer)  # finite streams drain the buffer at the end
        yield from buffer

    def _stream_batches(self, stream: int) -> Iterator[list[tuple[dict, bool]]]:
        """The batches of this rank's virtual stream `stream` as raw samples with their flips (not decoded)."""
        slots = self.world_size * self.streams
        slot = self.rank * self.streams + stream
        rng = random.Random(_slot_seed(self.seed, slot, slots))
        batch: list[tuple[dict, bool]] = []
        for sample in self._shuffled(slot, slots, rng):
            batch.append((sample, self.flip and rng.random() < 0.5))
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        v = self.streams
        # a fresh DataLoader asks its worker 0 first: worker w makes global batches first, first + W, ...
        first = self.skip_batches + worker
        shared = math.gcd(v, workers)
        mine = [s for s in range(v) if s % shared == first % shared]  # the streams batches first + kW come from
        batches = {s: self._stream_batches(s) for s in mine}
        next_index = {s: 0 for s in mine}
        exhausted: set[int] = set()
        b = first
        while len(exhausted) < len(mine):
            stream, index = b % v, b // v
            b += workers
            if stream in exhausted:
                continue  # finite streams only: this stream has ended, the others go on
            raw = None
            for raw in itertools.islice(batches[stream], index - next_index[stream], None):
                break  # the batches before it were consumed earlier or are other workers': skipped undecoded
            else:
                raw = None
            if raw is None:
                exhausted.add(stream)
                continue
            next_index[stream] = index + 1
            yield self._collate(raw)

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

    Checks at construction: the shards against their manifest (presence, counts, and sha256 unless
    verify=False) and that the set holds at least one global batch. Restore before iterating. The position
    depends on the data (manifest digest), seed, batch size, world size, shuffle buffer and flips, not on the
    worker count or where the shards lie; a mismatch is an error rather than a silently different data order.
    """

    def __init__(self, shard_dir: str | Path, batch_size: int, *, num_workers: int = 2, seed: int = 0,
                 shuffle_buffer: int = 2000, flip: bool = True, rank: int = 0, world_size: int = 1,
                 epochs: int | None = None, with_keys: bool = False, pin_memory: bool = False,
                 device: torch.device | str | None = None, verify: bool = True):
        self.kwargs = dict(shard_dir=shard_dir, batch_size=batch_size, seed=seed, shuffle_buffer=shuffle_buffer,
                           flip=flip, rank=rank, world_size=world_size, epochs=epochs, with_keys=with_keys)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.device = torch.device(device) if device is not None else None
        self.batches_consumed = 0
        self._iterator = None
        stream = ShardStream(**self.kwargs, verify=verify)  # checks the shards now, before any training
        self.manifest_sha256 = stream.manifest_sha256
        self.num_classes = stream.num_classes
        if epochs is None and stream.num_samples < batch_size * world_size:
            raise PixelgenError(f"{shard_dir} holds {stream.num_samples} images, fewer than one global batch "
                                f"({batch_size} x {world_size} ranks): use more images or a smaller "
                                f"data.batch_size")

    def check_num_classes(self, num_classes: int) -> None:
        check_num_classes(self.num_classes, num_classes, Path(self.kwargs["shard_dir"]))

    def _identity_of_order(self) -> dict:
        k = self.kwargs
        return {"seed": k["seed"], "batch_size": k["batch_size"], "world_size": k["world_size"], "rank": k["rank"],
                "shuffle_buffer": k["shuffle_buffer"], "flip": k["flip"], "manifest_sha256": self.manifest_sha256}

    def state_dict(self) -> dict:
        # num_workers is recorded for readers only: the order does not depend on it
        return {"batches_consumed": self.batches_consumed, **self._identity_of_order(),
                "num_workers": self.num_workers, "order": ORDER_VERSION}

    def load_state_dict(self, state: dict) -> None:
        mine = self._identity_of_order()
        # states saved before the digest was recorded carry none: nothing to compare
        different = sorted(k for k in mine if (k in state or k != "manifest_sha256") and state.get(k) != mine[k])
        if different:
            raise PixelgenError(f"cannot resume the data stream exactly: {', '.join(different)} changed since the "
                                f"checkpoint ({ {k: state.get(k) for k in different} } -> { {k: mine[k] for k in different} })")
        if "order" not in state:
            print("warning: this checkpoint's data position is from the earlier, worker-dependent stream order: "
                  "the resumed run continues with the same data but not the exact batches it would have seen",
                  file=sys.stderr)
        self.batches_consumed = state["batches_consumed"]
        self._iterator = None

    def __iter__(self):
        dataset = ShardStream(**self.kwargs, skip_batches=self.batches_consumed, verify=False)  # verified above
        worker_init = None
        if self.num_workers:
            dataset.parent_pid = os.getpid()
            worker_init = functools.partial(_worker_dies_with_parent, os.getpid())
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            persistent_workers=False, prefetch_factor=4 if self.num_workers else None,
                            worker_init_fn=worker_init)
        try:
            for batch in loader:
                self.batches_consumed += 1
                images = batch[0]
                if self.device is not None:  # move the compact uint8 batch, then scale on the device
                    images = images.to(self.device, non_blocking=True)
                images = images.float().div_(127.5).sub_(1.0)
                yield (images, *batch[1:])
        except PixelgenError as err:
            raise _one_line(err) from None
