"""Random access into tar shards: an index of each sample's byte range, reads by (shard, sample), decoding.

A shard is indexed once per process by walking its tar headers (the data is skipped with seeks); sample i
is the i-th group of consecutive members sharing a key (webdataset's grouping). A truncated or corrupt
tar yields an index of the complete samples before the damage plus the reason, so readers can name the
shard and fail or skip. The shards stay plain webdataset tars; this module only adds seeks.
Must not import models or engines.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from symeq_dist.data.schema import BadSample, Schema, decode

Decoded = dict[str, Any]  # {"image": uint8 (C, H, W), "label"?, "mask"?, "key": str}
_PACKED_MEMBERS = ("images.npy", "labels.npy", "keys.json")


@dataclass(frozen=True)
class ShardIndex:
    """Byte ranges [start, end) of each complete sample group of one tar, in file order."""

    path: str
    keys: tuple[str, ...]
    ranges: np.ndarray  # int64 (n, 2)
    damage: str | None  # why indexing stopped early (truncated or corrupt tar); None if the tar is whole


def split_member(name: str) -> tuple[str, str]:
    """'dir/000001.seg.png' -> ('dir/000001', 'seg.png'): the key ends at the first dot of the base name."""
    head, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{head}/{stem}" if head else stem), suffix


def index_shard(path: str | Path) -> ShardIndex:
    """Walk the tar headers of `path`; never raises for a damaged tar (see `ShardIndex.damage`)."""
    path = str(path)
    keys: list[str] = []
    ranges: list[list[int]] = []
    damage = None
    size = Path(path).stat().st_size
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE  # padded
                if end > size:
                    damage = f"member {info.name} is cut off at byte {size} (the tar is truncated)"
                    break
                key, _ = split_member(info.name)
                if keys and keys[-1] == key:
                    ranges[-1][1] = end
                else:
                    keys.append(key)
                    ranges.append([info.offset, end])
            if damage is None:
                damage = _tail_damage(f, tar.offset, size)
    except (tarfile.TarError, OSError, EOFError) as err:
        damage = f"the tar is corrupt after {len(keys)} samples ({type(err).__name__}: {err})"
    array = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
    return ShardIndex(path, tuple(keys), array, damage)


def _tail_damage(f: Any, offset: int, size: int) -> str | None:
    """tarfile stops quietly at a bad header after the first; what follows the last member must be zeros."""
    f.seek(offset)
    tail = f.read()
    if tail.strip(b"\0"):
        return f"corrupt tar header at byte {offset} (everything after it is unreadable)"
    if len(tail) < 2 * tarfile.BLOCKSIZE:
        return f"the tar ends at byte {size} without its end-of-archive blocks (it is truncated)"
    return None


def read_members(data: bytes) -> dict[str, bytes]:
    """The members of one sample group (its bytes from `ShardIndex.ranges`) as {suffix: bytes}.

    Plain ustar/GNU headers of regular files (what webdataset writes) are parsed here directly, 5x faster
    than tarfile; anything else (pax or long-name headers, a bad checksum) goes through tarfile.
    """
    out, offset, block = {}, 0, tarfile.BLOCKSIZE
    while offset + block <= len(data):
        header = data[offset:offset + block]
        if header[156:157] not in (b"0", b"\0") or header[257:262] != b"ustar" or not _checksum_ok(header):
            return _read_members_tarfile(data)
        name = header[:100].split(b"\0", 1)[0].decode("utf-8")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8")
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        start = offset + block
        if start + size > len(data):
            raise tarfile.ReadError("unexpected end of data")
        out[split_member(f"{prefix}/{name}" if prefix else name)[1]] = data[start:start + size]
        offset = start + -(-size // block) * block
    return out


def _checksum_ok(header: bytes) -> bool:
    stored = header[148:156].split(b"\0", 1)[0].strip()
    return bool(stored) and int(stored, 8) == sum(header[:148]) + 256 + sum(header[156:])


def _read_members_tarfile(data: bytes) -> dict[str, bytes]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            if info.isfile():
                out[split_member(info.name)[1]] = tar.extractfile(info).read()
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
        start, end = index.ranges[group]
        f = self._file(shard)
        f.seek(int(start))
        try:
            return index.keys[group], read_members(f.read(int(end - start)))
        except (tarfile.TarError, OSError) as err:
            raise BadSample(f"{name}, key {index.keys[group]}", f"unreadable tar members ({err})") from None

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
