"""The training stream: one global sample order per epoch, cut into equal per-rank batches, resumable anywhere.

Order. Epoch e of a split of N samples (counts from the manifest) has one order, the same on every rank
and for every layout: the units (samples; or packed blocks of samples) are permuted with a seed of
(seed, e), then samples are shuffled within consecutive windows of `data.shuffle_buffer`. With per-sample
shards the unit permutation alone is a full shuffle.

Batches. A training step takes the next S = world_size x B samples of that order (B = micro batch):
rank r gets positions [p + r B, p + (r + 1) B). So every rank gets exactly B sample slots per step,
whatever the number of shards; an epoch ends when fewer than S samples remain (the < S left over are not
used that epoch, and differ from epoch to epoch). DataLoader worker w of a rank serves its steps
w, w + W, ... and reads its samples by seeking into the tars (`tario.ShardReader`); the workers decode
to uint8; the training process converts to float.

Resume. The position is (epoch, p) at step k; the checkpoint stores it. A resumed run with the same
seed continues the same order at the same place, whatever its world size, workers or batch size: a new
layout takes the not-yet-used rest of the epoch in steps of its own S. With the same layout the resumed
samples are bitwise those of an uninterrupted run.

Bad samples. Policy `fail` raises the first bad sample's error (shard and key); `skip` drops bad samples
from their batch, counts them (`TrainStream.skipped`, logged as data/skipped) and names them in a warning.
Must not import models or engines.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from symeq_dist.config import DataConfig
from symeq_dist.data.manifest import load_manifest, samples_per_member, split_entries
from symeq_dist.data.schema import BadSample, Schema
from symeq_dist.data.tario import Decoded, ShardReader
from symeq_dist.data.transforms import to_float
from symeq_dist.errors import InputError

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

Batch = dict[str, Any]  # image uint8 (b, C, H, W); label int64 (b,) | uint8 (b, A); mask uint8 (b, H, W); code; key
STATE_VERSION = 2
_ORDER_PURPOSE = 0x5EED03  # first SeedSequence word of the epoch orders


class DataError(InputError):
    """Bad shards under policy `fail` (or every sample of a batch bad); the message names shard and key."""


def split_reader(shards_dir: Path, manifest: dict[str, Any], split: str) -> ShardReader:
    entries = split_entries(manifest, split, shards_dir=shards_dir)
    return ShardReader([str(shards_dir / e["name"]) for e in entries], [int(e["num_samples"]) for e in entries],
                       Schema.from_manifest(manifest), samples_per_member(manifest))


# ---------------------------------------------------------------- the global order

def epoch_order(counts: list[int], per_member: int, *, seed: int, epoch: int, window: int) -> np.ndarray:
    """Global sample ids (int64 (N,), id = offset of the shard + number within it) in epoch `epoch`'s order."""
    rng = np.random.default_rng(np.random.SeedSequence([_ORDER_PURPOSE, seed, epoch]))
    starts, lengths = [], []
    offset = 0
    for count in counts:
        for first in range(0, count, per_member):
            starts.append(offset + first)
            lengths.append(min(per_member, count - first))
        offset += count
    perm = rng.permutation(len(starts))
    starts_arr, lengths_arr = np.asarray(starts, dtype=np.int64)[perm], np.asarray(lengths, dtype=np.int64)[perm]
    # ids of the units in permuted order: start of each unit + 0..len-1
    unit_of = np.repeat(np.arange(len(perm)), lengths_arr)
    within = np.arange(len(unit_of)) - np.repeat(np.cumsum(lengths_arr) - lengths_arr, lengths_arr)
    ids = starts_arr[unit_of] + within
    if window > 1:
        ids = ids[np.argsort(np.arange(len(ids)) // window + rng.random(len(ids)), kind="stable")]
    return ids


@dataclass(frozen=True)
class Cursor:
    """Where step `step` starts: epoch `epoch`, position `pos` of its order; steps take `stride` samples."""

    step: int
    epoch: int
    pos: int
    stride: int  # samples per step over all ranks, S = world_size x B

    def at(self, step: int, num_samples: int) -> tuple[int, int]:
        """(epoch, position) of `step` >= self.step; an epoch ends when fewer than `stride` samples remain."""
        done, left = step - self.step, (num_samples - self.pos) // self.stride
        if done < left:
            return self.epoch, self.pos + done * self.stride
        per_epoch = num_samples // self.stride
        epochs, rest = divmod(done - left, per_epoch)
        return self.epoch + 1 + epochs, rest * self.stride


# ---------------------------------------------------------------- one worker's batches

@dataclass(frozen=True)
class _Plan:
    """Everything a worker needs (picklable)."""
    reader: ShardReader
    seed: int
    window: int
    rank: int
    world_size: int
    batch_size: int
    num_workers: int
    cursor: Cursor
    first_step: int  # the step the trainer will take next
    skip_bad: bool

    @property
    def num_samples(self) -> int:
        return self.reader.num_samples


def _worker_batches(plan: _Plan, worker: int) -> Iterator[Batch]:
    """Steps first_step + worker + m W, forever: this rank's B samples of each, decoded (bad ones per policy)."""
    offsets = np.cumsum([0, *plan.reader.counts])
    orders: dict[int, np.ndarray] = {}
    for step in range(plan.first_step + worker, 2**62, plan.num_workers):
        epoch, pos = plan.cursor.at(step, plan.num_samples)
        if epoch not in orders:
            orders = {epoch: epoch_order(plan.reader.counts, plan.reader.per_member, seed=plan.seed, epoch=epoch,
                                         window=plan.window)}
        start = pos + plan.rank * plan.batch_size
        ids = orders[epoch][start:start + plan.batch_size]
        shards = np.searchsorted(offsets, ids, side="right") - 1
        good: list[Decoded] = []
        bad: list[str] = []
        for shard, number in zip(shards.tolist(), (ids - offsets[shards]).tolist(), strict=True):
            try:
                good.append(plan.reader.read(shard, number))
            except BadSample as err:
                if not plan.skip_bad:
                    yield {"error": f"{err} (data.bad_samples=fail; set data.bad_samples=skip to skip bad samples, "
                                    "or check the shards with `symeq shards verify DIR`)"}
                    return
                bad.append(str(err))
        if not good:
            yield {"error": f"step {step}: all {len(ids)} samples of this rank's batch are bad ({bad[0]}); "
                            "check the shards with `symeq shards verify DIR`"}
            return
        yield {**collate(good), "skipped": len(bad), "bad": bad}


def collate(samples: list[Decoded]) -> Batch:
    """Stack decoded samples: image uint8 (b, C, H, W), label int64 (b,) or uint8 (b, A), mask uint8 (b, H, W),
    code float32 (b, *code_shape)."""
    batch: Batch = {"key": [s["key"] for s in samples]}
    for field in ("image", "code"):
        if field in samples[0]:
            batch[field] = torch.from_numpy(np.stack([s[field] for s in samples]))
    if "label" in samples[0]:
        labels = [s["label"] for s in samples]
        batch["label"] = (torch.tensor(labels, dtype=torch.int64) if isinstance(labels[0], int)
                          else torch.from_numpy(np.stack(labels)))
    if "mask" in samples[0]:
        batch["mask"] = torch.from_numpy(np.stack([s["mask"] for s in samples]))
    return batch


class _StepDataset(IterableDataset):
    def __init__(self, plan: _Plan) -> None:
        super().__init__()
        self.plan = plan

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        return _worker_batches(self.plan, 0 if info is None else info.id)


def _init_worker(worker_id: int) -> None:
    torch.set_num_threads(1)  # the workers share few cores with the training process


# ---------------------------------------------------------------- the train stream

class TrainStream:
    """Infinite per-rank stream of batches (see the module docstring); state = (step, epoch, position).

    `skipped` counts this rank's dropped bad samples (kept across resumes).
    """

    def __init__(self, plan: _Plan, *, use_workers: bool) -> None:
        self._plan = plan
        self._use_workers = use_workers
        self._cursor = plan.cursor
        self._batches = 0
        self.skipped = 0
        self._iterator: Iterator[Batch] | None = None
        self._closed = False

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise RuntimeError("the train stream was closed; build a new one")
        if self._iterator is None:
            self._iterator = self._start()
        batch = next(self._iterator)
        if "error" in batch:
            self.close()
            raise DataError(batch["error"])
        if batch["skipped"]:
            self.skipped += batch["skipped"]
            log.warning("rank %d skipped %d bad samples (data.bad_samples=skip; %d so far): %s", self._plan.rank,
                        batch["skipped"], self.skipped, "; ".join(batch["bad"][:3]))
        self._batches += 1
        return batch

    def _start(self) -> Iterator[Batch]:
        plan = replace(self._plan, cursor=self._cursor, first_step=self._batches)
        if not self._use_workers:
            return iter(_StepDataset(plan))
        return iter(DataLoader(_StepDataset(plan), batch_size=None, num_workers=plan.num_workers,
                               worker_init_fn=_init_worker, persistent_workers=False))

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, position in its order) of the next step."""
        return self._cursor.at(self._batches, self._plan.num_samples)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the next step, where it starts, and the layout for the record."""
        epoch, pos = self.position
        plan = self._plan
        return {"version": STATE_VERSION, "batches": self._batches, "epoch": epoch, "pos": pos,
                "skipped": self.skipped, "seed": plan.seed, "num_samples": plan.num_samples,
                "world_size": plan.world_size, "batch_size": plan.batch_size, "num_workers": plan.num_workers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at `state["batches"]`, from its (epoch, position); call before the first `next()`.

        A different layout (world size, batch size, workers) continues the same epoch order; a different
        seed or sample count (rewritten shards) is logged and starts the next epoch at its beginning.
        """
        if self._iterator is not None or self._batches:
            raise RuntimeError("load_state_dict must be called before the first next() of a fresh stream")
        if state.get("version") != STATE_VERSION:
            raise InputError(f"stream state version {state.get('version')} was written by another symeq-dist "
                             f"(this one reads {STATE_VERSION}); resume it with that version or start a new run")
        plan = self._plan
        batches, epoch, pos = int(state["batches"]), int(state["epoch"]), int(state["pos"])
        if (state["seed"], state["num_samples"]) != (plan.seed, plan.num_samples):
            log.warning("the checkpoint's data stream had seed %s over %s samples, now %s over %s: the data order "
                        "cannot continue; starting epoch %d at its beginning", state["seed"], state["num_samples"],
                        plan.seed, plan.num_samples, epoch + 1)
            epoch, pos = epoch + 1, 0
        else:
            layout = ("world_size", "batch_size", "num_workers")
            old, new = [state[k] for k in layout], [plan.world_size, plan.batch_size, plan.num_workers]
            if old != new:
                log.info("data stream resumed with %s = %s (was %s): epoch %d continues at position %d of %d",
                         "/".join(layout), new, old, epoch, pos, plan.num_samples)
        self._cursor = Cursor(step=batches, epoch=epoch, pos=pos, stride=self._cursor.stride)
        self._batches = batches
        self.skipped = int(state.get("skipped", 0))

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        iterator, self._iterator, self._closed = self._iterator, None, True
        shutdown = getattr(iterator, "_shutdown_workers", None)  # DataLoader iterators
        if shutdown is not None:
            shutdown()
        elif iterator is not None and hasattr(iterator, "close"):
            iterator.close()
        self._plan.reader.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_train_stream(shards_dir: Path, manifest: dict[str, Any], cfg: DataConfig, *, seed: int, rank: int,
                      world_size: int, batch_size: int) -> TrainStream:
    """This rank's `TrainStream` over `cfg.split` (see `symeq_dist.data.build_train_stream`)."""
    if batch_size < 1 or seed < 0 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1, seed >= 0 and 0 <= rank < world_size, got {batch_size}, {seed}, "
                         f"{rank}, {world_size}")
    reader = split_reader(shards_dir, manifest, cfg.split)
    stride = world_size * batch_size
    num_samples = sum(reader.counts)
    if num_samples < stride:
        raise InputError(f"split '{cfg.split}' holds {num_samples} samples, fewer than one step of {world_size} "
                         f"ranks x {batch_size} = {stride}: lower train.batch_size or add data")
    workers = max(1, cfg.num_workers)
    plan = _Plan(reader=reader, seed=seed, window=cfg.shuffle_buffer, rank=rank, world_size=world_size,
                 batch_size=batch_size, num_workers=workers, cursor=Cursor(0, 0, 0, stride), first_step=0,
                 skip_bad=cfg.bad_samples == "skip")
    readers = f"{cfg.num_workers} DataLoader worker(s)" if cfg.num_workers else "read in this process (num_workers 0)"
    log.info("train stream: split %s (%d samples in %d shards), rank %d/%d, %s, %d steps per epoch",
             cfg.split, num_samples, len(reader.paths), rank, world_size, readers, num_samples // stride)
    return TrainStream(plan, use_workers=cfg.num_workers > 0)


# ---------------------------------------------------------------- evaluation

def iter_eval_batches(shards_dir: Path, manifest: dict[str, Any], *, split: str, batch_size: int,
                      skip_bad: bool = False) -> Iterator[Batch]:
    """Every sample of `split` once, in shard order, in-process; the last batch may be short.

    Validation happens here, eagerly; the returned generator only reads. Bad samples raise `DataError`,
    or with `skip_bad` are left out with a warning.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return _eval_batches(split_reader(shards_dir, manifest, split), batch_size, skip_bad)


def _eval_batches(reader: ShardReader, batch_size: int, skip_bad: bool) -> Iterator[Batch]:
    pending: list[Decoded] = []
    try:
        for shard in range(len(reader.paths)):
            for sample in reader.samples(shard):
                if isinstance(sample, BadSample):
                    if not skip_bad:
                        raise DataError(f"{sample}; check the shards with `symeq shards verify DIR`")
                    log.warning("skipping a bad evaluation sample: %s", sample)
                    continue
                pending.append(sample)
                if len(pending) == batch_size:
                    yield collate(pending)
                    pending = []
        if pending:
            yield collate(pending)
    finally:
        reader.close()


def build_train_stream(cfg: DataConfig, *, seed: int, rank: int, world_size: int,
                       batch_size: int) -> TrainStream:
    """This rank's infinite, exactly resumable stream of `batch_size` (micro-batch) samples of `cfg.split`.

    Raises:
        FileNotFoundError: no manifest or a missing shard.
        ValueError: unknown/empty split, or fewer samples than one step (world_size x batch_size).
    """
    shards_dir = Path(cfg.shards)
    return open_train_stream(shards_dir, load_manifest(shards_dir), cfg, seed=seed, rank=rank,
                             world_size=world_size, batch_size=batch_size)


def build_eval_batches(cfg: DataConfig, *, split: str, batch_size: int) -> Iterator[Batch]:
    """Every sample of `split` exactly once, in shard order, in-process; the last batch may be short.

    Bad samples follow `cfg.bad_samples` (fail: DataError naming shard and key; skip: left out, logged).
    """
    shards_dir = Path(cfg.shards)
    return iter_eval_batches(shards_dir, load_manifest(shards_dir), split=split, batch_size=batch_size,
                             skip_bad=cfg.bad_samples == "skip")


def pixel_marginal(cfg: DataConfig, max_samples: int = 10000) -> torch.Tensor:
    """Each pixel's probability of 1 over the first `max_samples` images of the training split, binarised as
    training sees them (before noise); (C, H, W) float32, Laplace-smoothed so no pixel is exactly 0 or 1."""
    if cfg.binarize_threshold is None:
        raise ValueError("model.x_offset=data_marginal: a pixel marginal needs binarised data; set "
                         "data.binarize_threshold (or model.x_offset=none)")
    total, count = None, 0
    for batch in build_eval_batches(cfg, split=cfg.split, batch_size=500):
        x = to_float(batch["image"][: max_samples - count], cfg).double()
        total = x.sum(0) if total is None else total + x.sum(0)
        count += len(x)
        if count >= max_samples:
            break
    if total is None:
        raise ValueError(f"split {cfg.split!r} of {cfg.shards} holds no image")
    return ((total + 1) / (count + 2)).float()
