"""Random access into tar shards: an index of where each sample's members lie, reads by (shard, sample), decoding.

A shard is indexed once per process by walking its tar headers with `tarfile` (the data is skipped with
seeks); sample i is the i-th group of consecutive members sharing a key (webdataset's grouping), and the
index keeps each member's suffix, data offset and size, so a read is one seek and one read per member and
no header is parsed twice. Measured (`benchmarks/tar_read.py`, docs/benchmarks.md, 2 cores): 2.6x the
groups/s of re-parsing each group's ustar headers by hand (per-sample JPEG + cls) and 2.2x (packed blocks),
for the same index-building time. A truncated or corrupt tar yields an index of the complete samples before
the damage plus the reason, so readers can name the shard and fail or skip. The shards stay plain
webdataset tars; this module only adds seeks. Must not import models or engines.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from symeq_dist.data.schema import BadSample, Schema, decode

Decoded = dict[str, Any]  # {"image": uint8 (C, H, W), "label"?, "mask"?, "key": str}
_PACKED_MEMBERS = ("images.npy", "labels.npy", "keys.json")
SPARSE = -1  # the size recorded for a GNU sparse member: its bytes on disk are not its content
# What tarfile raises on crafted headers besides TarError: ValueError (a GNU sparse 1.0 map, a pax number),
# IndexError (a short GNU sparse extension block), RecursionError (a long chain of pax headers).
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, IndexError, RecursionError)


@dataclass(frozen=True)
class ShardIndex:
    """Where the members of each complete sample group of one tar lie, in file order.

    Group g's members are rows `first[g]:first[g + 1]` of `members`, each (suffix id, data offset, data
    size), in file order; `suffixes[id]` is the suffix ('png', 'seg.png', 'images.npy', ...).
    """

    path: str
    keys: tuple[str, ...]
    first: np.ndarray  # int64 (n + 1,)
    members: np.ndarray  # int64 (m, 3): suffix id, data offset, size (SPARSE for a sparse member)
    suffixes: tuple[str, ...]
    damage: str | None  # why indexing stopped early (truncated or corrupt tar); None if the tar is whole

    def group(self, number: int) -> list[tuple[str, int, int]]:
        """Sample group `number`'s members as (suffix, data offset, size), in file order (size SPARSE: unreadable)."""
        rows = self.members[self.first[number]:self.first[number + 1]].tolist()
        return [(self.suffixes[suffix], offset, size) for suffix, offset, size in rows]


def split_member(name: str) -> tuple[str, str]:
    """'dir/000001.seg.png' -> ('dir/000001', 'seg.png'): the key ends at the first dot of the base name."""
    head, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{head}/{stem}" if head else stem), suffix


def index_shard(path: str | Path) -> ShardIndex:
    """Walk the tar headers of `path`; never raises for a damaged tar (see `ShardIndex.damage`).

    When the tar is damaged, the group before the damage is kept only if the damaged member is known to
    start another key (it may lack members otherwise).
    """
    path = str(path)
    keys: list[str] = []
    first: list[int] = []
    rows: list[tuple[int, int, int]] = []
    suffix_ids: dict[str, int] = {}
    damage, damaged_key = None, None
    size = Path(path).stat().st_size
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                name = _printable(info.name)
                key, suffix = split_member(name)
                damage = _member_damage(info, name, size)
                if damage:
                    damaged_key = key
                    break
                if not keys or keys[-1] != key:
                    keys.append(key)
                    first.append(len(rows))
                rows.append((suffix_ids.setdefault(suffix, len(suffix_ids)), info.offset_data,
                             SPARSE if info.issparse() else info.size))
            if damage is None:
                damage = _tail_damage(f, tar.offset, size)
    except _TAR_ERRORS as err:
        damage = f"the tar is corrupt after {len(keys)} sample groups ({type(err).__name__}: {err})"
    if damage and keys and damaged_key in (None, keys[-1]):  # the last group may lack members: drop it
        del rows[first.pop():]
        keys.pop()
    members = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
    return ShardIndex(path, tuple(keys), np.asarray([*first, len(rows)], dtype=np.int64), members,
                      tuple(suffix_ids), damage)


def _printable(name: str) -> str:
    """tarfile decodes names with surrogateescape; write undecodable bytes as \\xNN so messages can print."""
    return name if name.isascii() else name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _member_damage(info: tarfile.TarInfo, name: str, size: int) -> str | None:
    if info.size < 0:  # base-256 size field; tarfile would step back and may loop over earlier headers
        return f"member {name} has a negative size {info.size} (a corrupt header; everything after it is unreadable)"
    if not info.issparse() and info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE > size:
        return f"member {name} is cut off at byte {size} (the tar is truncated)"
    return None


def _tail_damage(f: Any, offset: int, size: int) -> str | None:
    """tarfile stops quietly at a bad header after the first; what follows the last member must be zeros."""
    f.seek(offset)
    tail = f.read()
    if tail.strip(b"\0"):
        return f"corrupt tar header at byte {offset} (everything after it is unreadable)"
    if len(tail) < 2 * tarfile.BLOCKSIZE:
        return f"the tar ends at byte {size} without its end-of-archive blocks (it is truncated)"
    return None


def read_group(f: BinaryIO, members: list[tuple[str, int, int]]) -> dict[str, bytes]:
    """The members (`ShardIndex.group`) of one sample group as {suffix: bytes}: one seek and one read each
    (the file's buffer serves small neighbours). Raises EOFError if the file is shorter than indexed."""
    out = {}
    for suffix, offset, size in members:
        f.seek(offset)
        out[suffix] = f.read(size)
        if len(out[suffix]) < size:
            raise EOFError(f"the tar ends before byte {offset + size}, where its index puts the end of .{suffix} "
                           "(was the file rewritten?)")
    return out


class ShardReader:
    """Reads and decodes samples by (shard number, sample number) of one split; one per process.

    Indexes shards lazily, keeps a few files open and, for packed shards, a few decoded blocks.

    Args:
        paths: the split's shard paths in manifest order.
        counts: samples per shard from the manifest.
        schema: what a sample holds.
        per_member: samples per packed block (1 = the per-sample format).
    """

    def __init__(self, paths: list[str], counts: list[int], schema: Schema, per_member: int,
                 max_open: int = 16, max_blocks: int = 64) -> None:
        self.paths, self.counts, self.schema, self.per_member = paths, counts, schema, per_member
        self.names = [Path(p).name for p in paths]
        self.num_samples = sum(counts)
        self._index: dict[int, ShardIndex] = {}
        self._files: OrderedDict[int, Any] = OrderedDict()
        self._blocks: OrderedDict[tuple[int, int], list[Decoded]] = OrderedDict()
        self._max_open, self._max_blocks = max_open, max_blocks

    def index(self, shard: int) -> ShardIndex:
        if shard not in self._index:
            self._index[shard] = index_shard(self.paths[shard])
        return self._index[shard]

    def _file(self, shard: int) -> Any:
        f = self._files.pop(shard, None) or open(self.paths[shard], "rb")
        self._files[shard] = f
        while len(self._files) > self._max_open:
            self._files.popitem(last=False)[1].close()
        return f

    def _group(self, shard: int, group: int) -> tuple[str, dict[str, bytes]]:
        """The raw members of sample group `group` of `shard`; BadSample if the tar lost it."""
        index = self.index(shard)
        name = self.names[shard]
        if group >= len(index.keys):
            reason = index.damage or f"it holds {len(index.keys)} sample groups"
            raise BadSample(f"{name}, sample #{group}", f"not in the tar: {reason}")
        key, members = index.keys[group], index.group(group)
        sparse = [suffix for suffix, _, size in members if size == SPARSE]
        if sparse:
            raise BadSample(f"{name}, key {key}", f"member {key}.{sparse[0]} is a sparse file (tar --sparse), "
                                                  "which shard writers never make")
        try:
            return key, read_group(self._file(shard), members)
        except (EOFError, OSError) as err:
            raise BadSample(f"{name}, key {key}", f"unreadable tar members ({err})") from None

    def read(self, shard: int, number: int) -> Decoded:
        """Sample `number` of `shard`, decoded; raises `BadSample` naming the shard and key."""
        if self.per_member == 1:
            key, members = self._group(shard, number)
            sample = decode(members, self.schema, f"{self.names[shard]}, key {key}")
            sample["key"] = key
            return sample
        block_id = (shard, number // self.per_member)
        block = self._blocks.pop(block_id, None)
        if block is None:
            block = self._read_block(*block_id)
        self._blocks[block_id] = block
        while len(self._blocks) > self._max_blocks:
            self._blocks.popitem(last=False)
        offset = number % self.per_member
        if offset >= len(block):
            raise BadSample(f"{self.names[shard]}, block {block_id[1]}",
                            f"holds {len(block)} samples, sample {offset} is missing")
        return block[offset]

    def _read_block(self, shard: int, block: int) -> list[Decoded]:
        key, members = self._group(shard, block)
        where = f"{self.names[shard]}, block {key}"
        missing = [m for m in _PACKED_MEMBERS if m not in members]
        if missing:
            raise BadSample(where, f"lacks {missing} (a packed block holds images.npy, labels.npy, keys.json)")
        try:
            images = np.load(io.BytesIO(members["images.npy"]), allow_pickle=False)
            labels = np.load(io.BytesIO(members["labels.npy"]), allow_pickle=False)
            keys = json.loads(members["keys.json"])
        except (ValueError, OSError) as err:
            raise BadSample(where, f"does not load ({err})") from None
        shape, num = tuple(self.schema.image_shape), len(keys)
        if images.dtype != np.uint8 or images.shape != (num, *shape) or labels.shape != (num,):
            raise BadSample(where, f"holds images {images.dtype} {images.shape} and labels {labels.shape} for "
                                   f"{num} keys; the manifest says uint8 {shape}")
        classes = self.schema.num_classes or 0
        if num and (labels.min() < 0 or labels.max() >= classes):
            raise BadSample(where, f"labels {labels.min()}..{labels.max()} outside 0..{classes - 1}")
        return [{"image": image, "label": int(label), "key": k}
                for image, label, k in zip(images, labels.tolist(), keys, strict=True)]

    def samples(self, shard: int) -> Iterator[Decoded | BadSample]:
        """Every sample the manifest lists for `shard`, in order; a bad one is yielded as its BadSample."""
        for number in range(self.counts[shard]):
            try:
                yield self.read(shard, number)
            except BadSample as err:
                yield err

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._blocks.clear()

    def __getstate__(self) -> dict[str, Any]:  # to DataLoader workers: no open files, no caches
        state = self.__dict__.copy()
        state.update(_index={}, _files=OrderedDict(), _blocks=OrderedDict())
        return state
