"""Training and evaluation streams over the tar shards; webdataset reads the tars, this module orders them.

The train stream is infinite and resumable exactly (see `TrainStream`); the eval iterator is finite and
deterministic. Packed blocks are split into samples as they are read, before the shuffle buffer (numpy
views, nothing to decode); per-sample PNGs are decoded after shuffling, inside the workers.
Must not import models or engines; with shards.py the only importer of webdataset.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from symeq_dist.config import DataConfig
from symeq_dist.data.shards import PACKED, PER_SAMPLE

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

T = TypeVar("T")
Batch = dict[str, Any]  # {"image": uint8 (b, C, H, W), "label": int64 (b,), "key": list[str]}
Decoded = tuple[np.ndarray, int, str]  # (uint8 image (C, H, W), label, key)
STATE_VERSION = 1
_EPOCH_PURPOSE = 0x5EED01  # first SeedSequence word of the per-(rank, worker, epoch) order streams
_RESTART_PURPOSE = 0x5EED02  # first word of the seed used after a resume with a different layout
_STATE_KEYS = ("seed", "world_size", "num_workers", "batch_size")


# ---------------------------------------------------------------- splitting

def slot_shards(shards: Sequence[T], *, rank: int, worker: int, world_size: int, num_workers: int) -> list[T]:
    """The shards read by one (rank, worker) slot: slot s = rank * W + worker gets shards[s::R*W].

    Args:
        shards: the split's shards in manifest order.
        num_workers: W = max(1, data.num_workers) (an in-process reader counts as one worker).

    Raises:
        ValueError: fewer shards than R x W slots (every slot needs one; slots never share a shard).
    """
    slots = world_size * num_workers
    if not (0 <= rank < world_size and 0 <= worker < num_workers):
        raise ValueError(f"rank {rank} / worker {worker} out of range for world size {world_size} "
                         f"and {num_workers} workers")
    if len(shards) < slots:
        raise ValueError(f"{len(shards)} shards cannot feed {world_size} ranks x {num_workers} workers = "
                         f"{slots} (rank, worker) slots (each needs its own shard): lower data.num_workers, "
                         "or rewrite the shards with a smaller samples_per_shard so the split has that many")
    return list(shards[rank * num_workers + worker::slots])


def split_entries(manifest: dict[str, Any], split: str, *, shards_dir: Path) -> list[dict[str, Any]]:
    """The manifest's shard entries of `split`, each checked to exist on disk (checksums are not read).

    Raises:
        ValueError: unknown split, or a split without shards (the message lists the available splits).
        FileNotFoundError: a listed shard file is missing.
    """
    splits = manifest["splits"]
    available = ", ".join(f"{name} ({len(entry['shards'])} shards)" for name, entry in splits.items())
    if split not in splits or not splits[split]["shards"]:
        problem = "is not in" if split not in splits else "has no shards in"
        raise ValueError(f"split '{split}' {problem} {shards_dir / 'manifest.json'}; available splits: "
                         f"{available or 'none'} (set data.split / data.eval_split)")
    entries = splits[split]["shards"]
    for entry in entries:
        if not (shards_dir / entry["name"]).is_file():
            raise FileNotFoundError(f"shard {shards_dir / entry['name']} listed in the manifest is missing; "
                                    "rewrite the shards (`symeq shards ...`) or point data.shards elsewhere")
    return entries


def is_packed(manifest: dict[str, Any]) -> bool:
    """Whether the manifest's shards are packed blocks (no `format`: version 1, per-sample); ValueError if unknown."""
    layout = manifest.get("format", PER_SAMPLE)
    if layout not in (PACKED, PER_SAMPLE):
        raise ValueError(f"manifest format {layout!r} is unknown (this reader knows {PACKED!r} and "
                         f"{PER_SAMPLE!r}); rewrite the shards with `symeq shards ...` or update symeq_dist")
    return layout == PACKED


# ---------------------------------------------------------------- reading and decoding

def read_samples(path: str, *, packed: bool, image_shape: tuple[int, int, int]) -> Iterator[Any]:
    """One tar's samples in file order: `Decoded` tuples if packed, else raw {"__key__", "png", "cls"}.

    Packed blocks are checked against `image_shape` and split into per-sample views here, so a shuffle
    buffer and sample counting downstream see single samples in both formats.
    """
    with open(path, "rb") as stream:
        groups = group_by_keys(tar_file_expander([{"url": path, "stream": stream}]))
        if not packed:
            yield from groups
            return
        for block in groups:
            yield from _split_block(block, image_shape)


def _split_block(block: dict[str, Any], image_shape: tuple[int, int, int]) -> Iterator[Decoded]:
    """A packed block {"images.npy", "labels.npy", "keys.json"} -> its n samples (image views, no copy)."""
    where = f"block {block['__key__']} in {block['__url__']}"
    missing = [m for m in ("images.npy", "labels.npy", "keys.json") if m not in block]
    if missing:
        raise ValueError(f"{where} lacks {missing}; the manifest says packed shards, which hold images.npy "
                         "+ labels.npy + keys.json per block: rewrite them with `symeq shards ...`")
    images = np.load(BytesIO(block["images.npy"]), allow_pickle=False)  # (n, C, H, W)
    labels = np.load(BytesIO(block["labels.npy"]), allow_pickle=False)  # (n,)
    keys = json.loads(block["keys.json"])
    num = len(keys)
    if (images.dtype != np.uint8 or images.shape != (num, *image_shape) or labels.dtype != np.int64
            or labels.shape != (num,)):
        raise ValueError(f"{where} holds images {images.dtype} {images.shape} and labels {labels.dtype} "
                         f"{labels.shape} for {num} keys; the manifest says uint8 images of shape "
                         f"{tuple(image_shape)} and int64 labels: rewrite the shards")
    yield from zip(images, labels.tolist(), keys, strict=True)


def _decode(sample: Any, image_shape: tuple[int, int, int]) -> Decoded:
    """Sample from `read_samples` -> (uint8 image (C, H, W), label, key); only per-sample PNGs need work."""
    if isinstance(sample, tuple):  # from a packed block: split and checked while reading
        return sample
    key = sample["__key__"]
    missing = [m for m in ("png", "cls") if m not in sample]
    if missing:
        raise ValueError(f"sample {key} in {sample['__url__']} lacks {missing}; the manifest says per-sample "
                         "shards, which hold png + cls members: rewrite them with `symeq shards ...`")
    channels = image_shape[0]
    with Image.open(BytesIO(sample["png"])) as img:
        mode = "L" if channels == 1 else "RGB"
        array = np.asarray(img if img.mode == mode else img.convert(mode))
    array = array[None] if channels == 1 else array.transpose(2, 0, 1)
    if array.shape != tuple(image_shape):
        raise ValueError(f"sample {key} in {sample['__url__']} has shape {array.shape}, the manifest says "
                         f"{tuple(image_shape)}; rewrite the shards")
    return array, int(sample["cls"]), key


def count_samples(path: str, *, packed: bool, image_shape: tuple[int, int, int]) -> int:
    """Decode every sample of one tar (PNGs too) and count them; raises ValueError on a malformed one."""
    count = 0
    for sample in read_samples(path, packed=packed, image_shape=image_shape):
        _decode(sample, image_shape)  # only for its checks
        count += 1
    return count


def _collate(decoded: list[Decoded]) -> Batch:
    images, labels, keys = zip(*decoded, strict=True)
    return {"image": torch.from_numpy(np.stack(images)),  # (b, C, H, W) uint8
            "label": torch.tensor(labels, dtype=torch.int64),  # (b,)
            "key": list(keys)}


# ---------------------------------------------------------------- one worker's infinite sequence

@dataclass(frozen=True)
class _StreamPlan:
    """Everything a worker needs (picklable): its rank's slots and where the trainer stopped."""
    slots: tuple[tuple[str, ...], ...]  # W shard-path lists of this rank
    slot_sizes: tuple[int, ...]  # samples per slot and epoch (from the manifest)
    image_shape: tuple[int, int, int]
    packed: bool  # shard format: packed blocks or per-sample png + cls
    rank: int
    batch_size: int
    buffer_size: int
    stream_seed: int
    delivered: int = 0  # batches the trainer took since the order started (k - origin)

    @property
    def num_workers(self) -> int:
        return len(self.slots)


def _draws(rng: np.random.Generator, bound: int, chunk: int = 4096) -> Iterator[int]:
    """Uniform ints in [0, bound), drawn in chunks: one numpy call per sample costs ~4 us, a batch ~0.5 ms."""
    while True:
        yield from rng.integers(bound, size=chunk).tolist()


def _epoch_samples(plan: _StreamPlan, paths: Sequence[str], rng: np.random.Generator) -> Iterator[Any]:
    """One epoch of a slot: shards in an rng order through a shuffle buffer that drains at the end."""
    buffer: list[Any] = []
    buffer_size = plan.buffer_size  # a local: this loop runs once per sample
    order = rng.permutation(len(paths))
    picks = _draws(np.random.default_rng(rng.integers(2**63)), buffer_size)
    for index in order:
        for sample in read_samples(paths[index], packed=plan.packed, image_shape=plan.image_shape):
            if len(buffer) < buffer_size:
                buffer.append(sample)
                continue
            pick = next(picks)
            yield buffer[pick]
            buffer[pick] = sample
    while buffer:
        pick = int(rng.integers(len(buffer)))
        buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
        yield buffer.pop()


def _slot_samples(plan: _StreamPlan, worker: int, skip: int) -> Iterator[Any]:
    """The worker's infinite raw-sample sequence, minus its first `skip` samples (never decoded).

    Each epoch is self-contained (own rng, buffer drained), so whole epochs are skipped arithmetically.
    """
    paths, size = plan.slots[worker], plan.slot_sizes[worker]
    first_epoch, skip = divmod(skip, size)
    for epoch in itertools.count(first_epoch):
        entropy = [_EPOCH_PURPOSE, plan.stream_seed, plan.rank, worker, epoch]
        rng = np.random.default_rng(np.random.SeedSequence(entropy))
        count = 0
        for sample in _epoch_samples(plan, paths, rng):
            count += 1
            if count > skip:
                yield sample
        skip = 0
        if count != size:
            raise ValueError(f"shards {', '.join(paths)} hold {count} samples but the manifest says {size}; "
                             "they changed after the manifest was written: rewrite them (`symeq shards ...`)")


def _worker_batches(plan: _StreamPlan, worker: int) -> Iterator[Batch]:
    """Batches of exactly batch_size, forever; skips the batches this worker had already delivered."""
    already = len(range(worker, plan.delivered, plan.num_workers))  # trainer batch j came from worker j % W
    samples = _slot_samples(plan, worker, already * plan.batch_size)
    while True:
        raw = list(itertools.islice(samples, plan.batch_size))
        yield _collate([_decode(sample, plan.image_shape) for sample in raw])


class _SlotDataset(IterableDataset):
    """DataLoader worker i plays logical worker (i + delivered) % W, so after a resume the loader's
    round-robin (worker 0 first) still hands the trainer batch k from logical worker k % W."""

    def __init__(self, plan: _StreamPlan) -> None:
        super().__init__()
        self.plan = plan

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        index = 0 if info is None else info.id
        return _worker_batches(self.plan, (index + self.plan.delivered) % self.plan.num_workers)


def _init_worker(worker_id: int) -> None:
    torch.set_num_threads(1)  # the workers share few cores with the training process


# ---------------------------------------------------------------- the train stream

class TrainStream:
    """Infinite per-rank stream of {"image": uint8 (b, C, H, W), "label": int64 (b,), "key": list[str]}.

    Sampling is with replacement in spirit: epochs exist only per (rank, worker) slot; each slot reshuffles
    its shards and samples every epoch from a seed of (seed, rank, worker, epoch). The state is the number
    k of batches taken. Exact resume (`load_state_dict`) requires the same seed, world size, effective
    num_workers (0 and 1 are the same) and batch size; each worker then skips, undecoded, the samples it
    had delivered. On any mismatch a warning is logged and the order restarts at k from a new seed
    derived from (seed, k), so earlier samples are not simply repeated; k keeps counting.
    """

    def __init__(self, plan: _StreamPlan, *, seed: int, world_size: int, use_workers: bool) -> None:
        self._plan = plan
        self._seed = seed
        self._world_size = world_size
        self._use_workers = use_workers
        self._batches = 0
        self._origin = 0  # k at which the current order (stream seed) started
        self._stream_seed = seed
        self._iterator: Iterator[Batch] | None = None
        self._closed = False

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise RuntimeError("the train stream was closed; build a new one")
        if self._iterator is None:
            self._iterator = self._start()
        try:
            batch = next(self._iterator)
        except StopIteration:
            from symeq_dist.data import DataExhausted  # the package imports this module first
            raise DataExhausted("the train stream ended, which it never should; check the shards") from None
        self._batches += 1
        return batch

    def _start(self) -> Iterator[Batch]:
        plan = replace(self._plan, stream_seed=self._stream_seed, delivered=self._batches - self._origin)
        if not self._use_workers:
            return iter(_SlotDataset(plan))
        loader = DataLoader(_SlotDataset(plan), batch_size=None, num_workers=plan.num_workers,
                            worker_init_fn=_init_worker)
        return iter(loader)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: batches taken plus what exact resume must match."""
        return {"version": STATE_VERSION, "batches": self._batches, "origin": self._origin,
                "stream_seed": self._stream_seed, **self._layout()}

    def _layout(self) -> dict[str, int]:
        return {"seed": self._seed, "world_size": self._world_size, "num_workers": self._plan.num_workers,
                "batch_size": self._plan.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after `state["batches"]` batches; call before the first `next()`.

        Missing layout keys are taken to match the current stream.
        """
        if self._iterator is not None or self._batches:
            raise RuntimeError("load_state_dict must be called before the first next() of a fresh stream")
        if "batches" not in state or int(state["batches"]) < 0:
            raise ValueError(f"stream state needs a non-negative 'batches' entry, got {state!r}")
        batches = int(state["batches"])
        saved = {key: state.get(key, value) for key, value in self._layout().items()}
        if saved == self._layout():
            self._origin = int(state.get("origin", 0))
            self._stream_seed = int(state.get("stream_seed", self._seed))
        else:
            log.warning("stream state saved with %s, now %s: exact resume needs the same values; the data "
                        "order restarts at batch %d from a seed derived from (seed, %d)",
                        saved, self._layout(), batches, batches)
            self._origin = batches
            entropy = [_RESTART_PURPOSE, self._seed, batches]
            self._stream_seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
        self._batches = batches

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        iterator, self._iterator, self._closed = self._iterator, None, True
        shutdown = getattr(iterator, "_shutdown_workers", None)  # DataLoader iterators
        if shutdown is not None:
            shutdown()
        elif iterator is not None and hasattr(iterator, "close"):
            iterator.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_train_stream(shards_dir: Path, manifest: dict[str, Any], cfg: DataConfig, *, seed: int, rank: int,
                      world_size: int, batch_size: int) -> TrainStream:
    """Build this rank's `TrainStream` over `cfg.split` (see `build_train_stream`)."""
    if batch_size < 1 or seed < 0:
        raise ValueError(f"batch_size must be >= 1 and seed >= 0, got {batch_size} and {seed}")
    entries = split_entries(manifest, cfg.split, shards_dir=shards_dir)
    workers = max(1, cfg.num_workers)
    slots = [slot_shards(entries, rank=rank, worker=w, world_size=world_size, num_workers=workers)
             for w in range(workers)]
    plan = _StreamPlan(
        slots=tuple(tuple(str(shards_dir / e["name"]) for e in slot) for slot in slots),
        slot_sizes=tuple(sum(int(e["num_samples"]) for e in slot) for slot in slots),
        image_shape=tuple(manifest["image_shape"]), packed=is_packed(manifest), rank=rank, batch_size=batch_size,
        buffer_size=cfg.shuffle_buffer, stream_seed=seed)
    if min(plan.slot_sizes) == 0:
        raise ValueError(f"a (rank, worker) slot of split '{cfg.split}' got only empty shards "
                         f"(samples per slot: {plan.slot_sizes}); rewrite the shards")
    log.info("train stream: split %s, rank %d/%d, %d worker(s), shards per worker %s, samples per worker %s",
             cfg.split, rank, world_size, workers, [len(s) for s in slots], list(plan.slot_sizes))
    return TrainStream(plan, seed=seed, world_size=world_size, use_workers=cfg.num_workers > 0)


# ---------------------------------------------------------------- evaluation

def iter_eval_batches(shards_dir: Path, manifest: dict[str, Any], *, split: str,
                      batch_size: int) -> Iterator[Batch]:
    """Every sample of `split` once, in shard order, in-process; the last batch may be short.

    Validation happens here, eagerly; the returned generator only reads.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    paths = [str(shards_dir / e["name"]) for e in split_entries(manifest, split, shards_dir=shards_dir)]
    return _eval_batches(paths, tuple(manifest["image_shape"]), batch_size, packed=is_packed(manifest))


def _eval_batches(paths: list[str], image_shape: tuple[int, int, int], batch_size: int, *,
                  packed: bool) -> Iterator[Batch]:
    pending: list[Decoded] = []
    for path in paths:
        for sample in read_samples(path, packed=packed, image_shape=image_shape):
            pending.append(_decode(sample, image_shape))
            if len(pending) == batch_size:
                yield _collate(pending)
                pending = []
    if pending:
        yield _collate(pending)
