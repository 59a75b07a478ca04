"""Sample groups/s read from tar shards: re-parsing each group's ustar headers by hand vs member offsets in the index.

Data, written to a temporary directory (removed at the end unless `--keep`):

- per_sample: N synthetic photo-like 64x64 RGB images (`image_stream.make_sample`) with a class label, written
  by `symeq_dist.datasets.convert.convert` as per-sample groups `<key>.cls` + `<key>.jpg` (quality 95),
  256 per shard, like the CelebA converter (which writes `.jpg` + `.attr.npy`).
- packed: the real MNIST-5k train split (4,500 digits) written by `write_mnist_shards`: blocks of 256 digits,
  each a group `images.npy` (200 kB) + `labels.npy` + `keys.json`, 500 digits per shard.

Contenders per format, one process, interleaved in rounds (`_common.run_rounds`, units = groups read), each
reading every group of the split once per pass in one fixed random order, from files kept open (as
`ShardReader` does), from the page cache:

- old_parse: the reader issue 9 deleted (an in-file copy of `read_members` as of commit a40cb71): seek to the
  group's byte range from the old index, read it, parse each 512-byte ustar header by hand (type, magic,
  checksum, name, prefix, octal size) and slice the data.
- offsets: the kept reader, `tario.read_group(f, index.group(g))` with `tario.index_shard`'s index: one seek
  and one read per member, by the group's (suffix, data offset, size) rows.
- offsets_one_read: the same index, one seek and one read from the group's first data byte to its last,
  sliced into members.
- read_decode (context): `ShardReader.read`, i.e. offsets plus decoding (JPEG + label; packed: two `np.load`
  and the keys, with a one-block cache so that every read decodes).

Then the index build, units = shards: old_index (the in-file copy of the old `index_shard`, byte ranges only)
vs index (`tario.index_shard`, which also keeps every member's suffix, offset and size).

    .venv/bin/python benchmarks/tar_read.py          # about 1 min on 2 cores, 9 rounds
    .venv/bin/python benchmarks/tar_read.py --help

Prints the command line, then per format: groups/s of each contender (median of rounds, and the rounds),
and the ratios offsets / old_parse, offsets_one_read / old_parse and offsets / offsets_one_read (medians
of the per-round ratios, in groups/s).
Before timing, every group is read by all three readers and checked to give the same members.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shlex
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from _common import ROOT, add_threads_arg, bench_dir, fmt_rounds, median, ratio, remove_dir, run_rounds, set_threads
from image_stream import make_sample as make_photo

from symeq_dist.data.manifest import samples_per_member
from symeq_dist.data.schema import Sample, Schema
from symeq_dist.data.tario import ShardIndex, ShardReader, index_shard, read_group, split_member
from symeq_dist.datasets.convert import convert
from symeq_dist.datasets.mnist import write_mnist_shards
from symeq_dist.runtime.monitor import setup_logging

SIZE = 64
NUM_CLASSES = 10


# ---------------------------------------------------------------- the deleted reader (tario.py at a40cb71)

def old_index_ranges(path: str) -> np.ndarray:
    """The old `index_shard`: byte ranges [first header, padded end) of each group, int64 (n, 2) (keys and the
    damage text dropped on return; computed as before, tail check included)."""
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
                f.seek(tar.offset)
                damage = f.read().strip(b"\0") or None
    except (tarfile.TarError, OSError, EOFError) as err:
        damage = f"the tar is corrupt after {len(keys)} samples ({type(err).__name__}: {err})"
    assert damage is None, damage
    return np.asarray(ranges, dtype=np.int64).reshape(-1, 2)


def old_read_members(data: bytes) -> dict[str, bytes]:
    """The old hand parser of a group's bytes: plain ustar/GNU headers here, anything else through tarfile."""
    out, offset, block = {}, 0, tarfile.BLOCKSIZE
    while offset + block <= len(data):
        header = data[offset:offset + block]
        if header[156:157] not in (b"0", b"\0") or header[257:262] != b"ustar" or not _old_checksum_ok(header):
            return _old_read_members_tarfile(data)
        name = header[:100].split(b"\0", 1)[0].decode("utf-8")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8")
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        start = offset + block
        if start + size > len(data):
            raise tarfile.ReadError("unexpected end of data")
        out[split_member(f"{prefix}/{name}" if prefix else name)[1]] = data[start:start + size]
        offset = start + -(-size // block) * block
    return out


def _old_checksum_ok(header: bytes) -> bool:
    stored = header[148:156].split(b"\0", 1)[0].strip()
    return bool(stored) and int(stored, 8) == sum(header[:148]) + 256 + sum(header[156:])


def _old_read_members_tarfile(data: bytes) -> dict[str, bytes]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            if info.isfile():
                out[split_member(info.name)[1]] = tar.extractfile(info).read()
    return out


def read_old(f: BinaryIO, start: int, end: int) -> dict[str, bytes]:
    f.seek(start)
    return old_read_members(f.read(end - start))


def read_one(f: BinaryIO, members: list[tuple[str, int, int]]) -> dict[str, bytes]:
    """The other offsets reader: one read from the group's first data byte to its last, sliced."""
    start = members[0][1]
    f.seek(start)
    data = f.read(members[-1][1] + members[-1][2] - start)
    return {suffix: data[offset - start:offset - start + size] for suffix, offset, size in members}


# ---------------------------------------------------------------- data and contenders

def make_sample(index: int) -> Sample:
    """A 64x64 photo-like RGB image (see `image_stream.make_sample`) with class index % 10."""
    return Sample(image=make_photo([SIZE, index]).image, label=index % NUM_CLASSES)


def write_per_sample(out: Path, images: int) -> None:
    convert(out, dataset="photo64", splits={"train": list(range(images))}, make_sample=make_sample,
            schema=Schema((3, SIZE, SIZE), "jpg", num_classes=NUM_CLASSES), samples_per_shard=256, workers=2,
            meta={})


class Shards:
    """The train split of one shard set: paths, open files, both indexes, a fixed random group order."""

    def __init__(self, shards: Path) -> None:
        manifest = json.loads((shards / "manifest.json").read_text())
        self.paths = [str(shards / e["name"]) for e in manifest["splits"]["train"]["shards"]]
        self.counts = [int(e["num_samples"]) for e in manifest["splits"]["train"]["shards"]]
        self.per_member = samples_per_member(manifest)
        self.schema = Schema.from_manifest(manifest)
        self.index: list[ShardIndex] = [index_shard(p) for p in self.paths]
        self.ranges = [old_index_ranges(p) for p in self.paths]
        assert all(i.damage is None for i in self.index)
        pairs = [(s, g) for s, index in enumerate(self.index) for g in range(len(index.keys))]
        self.order = [pairs[i] for i in np.random.default_rng(0).permutation(len(pairs))]
        self.files: dict[str, dict[int, BinaryIO]] = {}
        self.bytes = sum(int(i.members[:, 2].sum()) for i in self.index)
        self.members = sum(len(i.members) for i in self.index) / len(pairs)

    def file(self, contender: str, shard: int) -> BinaryIO:
        files = self.files.setdefault(contender, {})
        if shard not in files:
            files[shard] = open(self.paths[shard], "rb")  # closed in close()
        return files[shard]

    def check(self) -> None:
        for shard, group in self.order:
            start, end = self.ranges[shard][group].tolist()
            members = self.index[shard].group(group)
            old = read_old(self.file("old_parse", shard), start, end)
            assert old == read_group(self.file("offsets", shard), members)
            assert old == read_one(self.file("offsets_one_read", shard), members)

    def close(self) -> None:
        for files in self.files.values():
            for f in files.values():
                f.close()


def contenders(data: Shards) -> dict[str, Callable[[], object]]:
    """One pass over every group in `data.order` per contender."""
    def old_parse() -> None:
        for shard, group in data.order:
            start, end = data.ranges[shard][group].tolist()
            read_old(data.file("old_parse", shard), start, end)

    def offsets() -> None:
        for shard, group in data.order:
            read_group(data.file("offsets", shard), data.index[shard].group(group))

    def offsets_one_read() -> None:
        for shard, group in data.order:
            read_one(data.file("offsets_one_read", shard), data.index[shard].group(group))

    reader = ShardReader(data.paths, data.counts, data.schema, data.per_member, max_blocks=1)
    for shard in range(len(data.paths)):
        reader.index(shard)

    def read_decode() -> None:
        for shard, group in data.order:
            reader.read(shard, group * data.per_member)

    return {"old_parse": old_parse, "offsets": offsets, "offsets_one_read": offsets_one_read,
            "read_decode": read_decode}


def bench_format(title: str, data: Shards, args: argparse.Namespace, passes: int, index_passes: int) -> None:
    data.check()
    groups = len(data.order)
    passes_of = {name: (passes if name != "read_decode" else max(1, passes // args.decode_divisor))
                 for name in ("old_parse", "offsets", "offsets_one_read", "read_decode")}
    fns = {name: (lambda n, fn=fn: [fn() for _ in range(n // groups)]) for name, fn in contenders(data).items()}
    units = {name: passes_of[name] * groups for name in fns}
    start = time.perf_counter()
    times = run_rounds(fns, rounds=args.rounds, units=units)  # seconds per group
    elapsed = time.perf_counter() - start
    print(f"\n{title}: {groups} groups ({data.members:.0f} members each, {data.bytes / groups / 1e3:.1f} kB of member "
          f"data) in {len(data.paths)} shards, {args.rounds} rounds in {elapsed:.0f} s; per segment: "
          f"{passes} passes ({passes_of['read_decode']} for read_decode), index {index_passes} passes")
    for name, values in times.items():
        rates = [1 / v for v in values]
        print(f"  {name:16s} {median(rates):9,.0f} groups/s   (rounds: {fmt_rounds(rates, 1, 0)})")
    for num, den in (("offsets", "old_parse"), ("offsets_one_read", "old_parse"), ("offsets", "offsets_one_read")):
        mid, low, high = ratio(times, den, num)  # seconds per group: den/num = num's rate / den's rate
        print(f"  ratio {num} / {den} (groups/s): median {mid:.2f}  (per round {low:.2f} .. {high:.2f})")
    index_times = run_rounds({"old_index": lambda n: [old_index_ranges(p) for _ in range(n) for p in data.paths],
                              "index": lambda n: [index_shard(p) for _ in range(n) for p in data.paths]},
                             rounds=args.rounds, units=index_passes)
    for name, values in index_times.items():
        rates = [len(data.paths) / v for v in values]
        print(f"  {name:16s} {median(rates):9,.0f} shards/s   (rounds: {fmt_rounds(rates, 1, 0)})")
    mid, low, high = ratio(index_times, "old_index", "index")
    print(f"  ratio index / old_index (shards/s): median {mid:.2f}  (per round {low:.2f} .. {high:.2f})")
    data.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096, help="per-sample 64x64 images (256 per shard)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--passes", type=int, default=8, help="passes over the per-sample groups per segment")
    parser.add_argument("--packed-passes", type=int, default=800, help="passes over the packed groups per segment")
    parser.add_argument("--decode-divisor", type=int, default=8,
                        help="read_decode runs passes / this many passes per segment (decoding is slower)")
    parser.add_argument("--index-passes", type=int, default=4,
                        help="index builds of every per-sample shard per segment")
    parser.add_argument("--packed-index-passes", type=int, default=100,
                        help="index builds of every packed shard per segment")
    parser.add_argument("--keep", action="store_true", help="keep the temporary shard directory (its path is printed)")
    add_threads_arg(parser)
    args = parser.parse_args()
    set_threads(args.threads)
    setup_logging(1)  # warnings only
    logging.getLogger("symeq_dist.datasets.convert").setLevel(logging.WARNING)
    print("$ " + shlex.join([os.path.relpath(sys.executable, ROOT), os.path.relpath(__file__, ROOT), *sys.argv[1:]]))
    tmp = bench_dir("symeq-bench-tar-read-")
    try:
        start = time.perf_counter()
        write_per_sample(tmp / "per_sample", args.images)
        write_mnist_shards(tmp / "packed")
        print(f"wrote the shards in {time.perf_counter() - start:.0f} s to {tmp}; python {sys.version.split()[0]}, "
              f"cores {os.cpu_count()}, load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
        bench_format(f"per_sample {SIZE}x{SIZE} JPEG q95 + cls", Shards(tmp / "per_sample"), args, args.passes,
                     args.index_passes)
        bench_format("packed MNIST, blocks of 256", Shards(tmp / "packed"), args, args.packed_passes,
                     args.packed_index_passes)
        print(f"\nload average at the end {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            remove_dir(tmp)


if __name__ == "__main__":
    main()
