"""Tests of symeq_dist.data: real tar shards of real MNIST-5k digits written to tmp_path and read back.

Stream tests use packed shards with small blocks (16 samples, so shards hold several blocks and a short
last one); the per-sample png format is tested where the format matters.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import shutil
import struct
import tarfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch

from symeq_dist.config import DataConfig
from symeq_dist.data import (
    DataError,
    TrainStream,
    add_noise,
    build_eval_batches,
    build_train_stream,
    load_manifest,
    to_float,
    verify_shards,
)
from symeq_dist.datasets.mnist import (
    read_idx,
    read_mnist_5k,
    stratified_split,
    write_fashion_mnist_shards,
    write_mnist_shards,
)
from symeq_dist.datasets.packed import write_shards

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
Digits = tuple[np.ndarray, np.ndarray]  # real MNIST-5k: images (5000, 28, 28) uint8, labels (5000,)


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def digits() -> Digits:
    return read_mnist_5k()


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mnist")
    write_mnist_shards(out, seed=0, samples_per_shard=100)
    return out


def small_shards(out: Path, digits: Digits, *, num: int, per_shard: int, per_member: int = 16) -> Path:
    """A `train` split of `num` real digits (shuffled) plus a 40-sample `valid` split; per_member=1: png."""
    images, labels = digits
    order = np.random.default_rng(123).permutation(len(labels))
    train, valid = order[:num], order[num:num + 40]
    write_shards(out, {"train": (images[train], labels[train]), "valid": (images[valid], labels[valid])},
                 dataset="digits", samples_per_shard=per_shard, meta={"seed": 123}, samples_per_member=per_member)
    return out


def source_of(digits: Digits) -> dict[str, tuple[np.ndarray, int]]:
    """small_shards' train keys -> (image (28, 28), label) of the real digit written under that key."""
    order = np.random.default_rng(123).permutation(len(digits[1]))
    return {f"{i:06d}": (digits[0][j], int(digits[1][j])) for i, j in enumerate(order[:400])}


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def edit_manifest(shards: Path, **changes: object) -> None:
    manifest = json.loads((shards / "manifest.json").read_text())
    for key, value in changes.items():
        if value is None:
            del manifest[key]
        else:
            manifest[key] = value
    (shards / "manifest.json").write_text(json.dumps(manifest))


def take(stream: TrainStream, n: int) -> list[dict]:
    return [next(stream) for _ in range(n)]


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["key"] == y["key"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])


def write_idx(path: Path, array: np.ndarray, *, compress: bool = False) -> None:
    data = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)


# ---------------------------------------------------------------- writers

def test_mnist_writer_counts_manifest_and_pixels(mnist_dir: Path, digits: Digits) -> None:
    manifest = load_manifest(mnist_dir)
    assert manifest["dataset"] == "mnist" and manifest["image_shape"] == [1, 28, 28]
    assert manifest["format"] == "packed" and manifest["samples_per_member"] == 256
    assert manifest["num_classes"] == 10 and manifest["seed"] == 0
    assert manifest["binarize_threshold_hint"] == 112 and "command" in manifest
    assert len(manifest["source"]["sha256"]) == 64
    counts = {s: e["num_samples"] for s, e in manifest["splits"].items()}
    assert counts == {"train": 4500, "valid": 500}
    assert len(manifest["splits"]["train"]["shards"]) == 45
    cfg = DataConfig(shards=str(mnist_dir))
    train_idx, valid_idx = stratified_split(digits[1], seed=0, num_valid_per_class=50)
    for split, idx, per_class in (("train", train_idx, 450), ("valid", valid_idx, 50)):
        batches = list(build_eval_batches(cfg, split=split, batch_size=512))
        images = torch.cat([b["image"] for b in batches])
        labels = torch.cat([b["label"] for b in batches])
        assert images.shape == (len(idx), 1, 28, 28) and images.dtype == torch.uint8
        assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() <= 9
        assert torch.bincount(labels).tolist() == [per_class] * 10
        assert len(set(keys_of(batches))) == len(idx)
        # raw grey pixels, in the writer's shuffled order
        assert np.array_equal(images[:, 0].numpy(), digits[0][idx])
        assert np.array_equal(labels.numpy(), digits[1][idx])


def test_mnist_writer_is_byte_identical(mnist_dir: Path, tmp_path: Path) -> None:
    again = write_mnist_shards(tmp_path, seed=0, samples_per_shard=100)
    tars = sorted(p.name for p in mnist_dir.glob("*.tar"))
    assert tars == sorted(p.name for p in tmp_path.glob("*.tar")) and len(tars) == 50
    for name in tars:
        assert (mnist_dir / name).read_bytes() == (tmp_path / name).read_bytes(), name
    assert again["splits"] == load_manifest(mnist_dir)["splits"]
    entry = again["splits"]["valid"]["shards"][0]
    assert hashlib.sha256((tmp_path / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]
    report = verify_shards(tmp_path)
    assert report.ok and (report.shards, report.samples) == (50, 5000)
    corrupt = bytearray((tmp_path / entry["name"]).read_bytes())
    corrupt[1000] ^= 1
    (tmp_path / entry["name"]).write_bytes(bytes(corrupt))
    report = verify_shards(tmp_path)
    assert not report.ok and any(entry["name"] in p for p in report.problems)


def test_read_idx_round_trip(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    labels = np.arange(5, dtype=np.uint8)
    write_idx(tmp_path / "images-idx3-ubyte", images)
    write_idx(tmp_path / "labels-idx1-ubyte.gz", labels, compress=True)
    assert np.array_equal(read_idx(tmp_path / "images-idx3-ubyte"), images)
    assert np.array_equal(read_idx(tmp_path / "labels-idx1-ubyte.gz"), labels)


def test_read_idx_errors(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"PK\x03\x04" + bytes(20))
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "int32").write_bytes(bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 1) + bytes(4))
    with pytest.raises(ValueError, match="0x0c is not supported"):
        read_idx(tmp_path / "int32")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + bytes(3))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")


def test_idx_writer_on_synthetic_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    data = {prefix: (rng.integers(0, 256, (num, 28, 28), dtype=np.uint8),
                     rng.integers(0, 10, num, dtype=np.uint8))
            for prefix, num in (("train", 30), ("t10k", 10))}
    for prefix, (images, labels) in data.items():
        write_idx(idx_dir / f"{prefix}-images-idx3-ubyte.gz", images, compress=True)
        write_idx(idx_dir / f"{prefix}-labels-idx1-ubyte", labels)
    manifest = write_fashion_mnist_shards(tmp_path / "out", idx_dir=idx_dir, samples_per_shard=8)
    assert manifest["dataset"] == "fashion-mnist"
    assert {s: e["num_samples"] for s, e in manifest["splits"].items()} == {"train": 30, "valid": 10}
    raw = gzip.decompress((idx_dir / "train-images-idx3-ubyte.gz").read_bytes())
    checksums = manifest["source"]["sha256_decompressed"]
    assert checksums["train-images-idx3-ubyte.gz"] == hashlib.sha256(raw).hexdigest()
    batches = list(build_eval_batches(DataConfig(shards=str(tmp_path / "out")), split="valid", batch_size=4))
    assert [len(b["key"]) for b in batches] == [4, 4, 2]
    assert np.array_equal(torch.cat([b["image"] for b in batches])[:, 0].numpy(), data["t10k"][0])
    assert np.array_equal(torch.cat([b["label"] for b in batches]).numpy(), data["t10k"][1])


def test_fashion_writer_missing_dir_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        write_fashion_mnist_shards(tmp_path / "out", idx_dir=tmp_path / "nowhere")


@pytest.mark.skipif(not FASHION_DIR.is_dir(),
                    reason="Fashion-MNIST missing: run `apt-get install dataset-fashion-mnist`")
def test_fashion_writer_on_real_files(tmp_path: Path) -> None:
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    real = {}
    for prefix, num in (("train", 300), ("t10k", 100)):  # a real slice keeps the test quick
        images = read_idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz")
        assert len(images) == len(labels) == {"train": 60000, "t10k": 10000}[prefix]
        real[prefix] = images[:num], labels[:num]
        write_idx(idx_dir / f"{prefix}-images-idx3-ubyte", images[:num])
        write_idx(idx_dir / f"{prefix}-labels-idx1-ubyte", labels[:num])
    manifest = write_fashion_mnist_shards(tmp_path / "out", idx_dir=idx_dir, samples_per_shard=100)
    assert manifest["image_shape"] == [1, 28, 28] and manifest["num_classes"] == 10
    batches = list(build_eval_batches(DataConfig(shards=str(tmp_path / "out")), split="train", batch_size=64))
    assert np.array_equal(torch.cat([b["image"] for b in batches])[:, 0].numpy(), real["train"][0])
    assert np.array_equal(torch.cat([b["label"] for b in batches]).numpy(), real["train"][1])


# ---------------------------------------------------------------- shard formats

def assert_matches_source(batches: list[dict], source: dict[str, tuple[np.ndarray, int]]) -> None:
    for batch in batches:
        for key, image, label in zip(batch["key"], batch["image"], batch["label"], strict=True):
            assert np.array_equal(image[0].numpy(), source[key][0]) and int(label) == source[key][1], key


def test_packed_round_trip(tmp_path: Path, digits: Digits) -> None:
    small_shards(tmp_path, digits, num=130, per_shard=50)  # train shards 50, 50, 30; blocks of 16
    manifest = load_manifest(tmp_path)
    assert manifest["format"] == "packed" and manifest["samples_per_member"] == 16
    members = tar_members(tmp_path / "digits-train-000002.tar")  # samples 100..129: blocks of 16 and 14
    assert sorted(members) == [f"{k}.{m}" for k in ("000100", "000116")
                               for m in ("images.npy", "keys.json", "labels.npy")]
    images = np.load(BytesIO(members["000116.images.npy"]), allow_pickle=False)
    assert images.dtype == np.uint8 and images.shape == (14, 1, 28, 28)
    assert np.load(BytesIO(members["000116.labels.npy"]), allow_pickle=False).dtype == np.int64
    assert json.loads(members["000116.keys.json"]) == [f"{i:06d}" for i in range(116, 130)]
    source = source_of(digits)
    evaluated = list(build_eval_batches(DataConfig(shards=str(tmp_path)), split="train", batch_size=32))
    assert keys_of(evaluated) == [f"{i:06d}" for i in range(130)]
    assert_matches_source(evaluated, source)
    cfg = DataConfig(shards=str(tmp_path), num_workers=0, shuffle_buffer=40)
    with build_train_stream(cfg, seed=0, rank=0, world_size=1, batch_size=13) as stream:
        epoch = take(stream, 10)  # one epoch: every sample once, shuffled across blocks, with its own pixels
    keys = keys_of(epoch)
    assert len(set(keys)) == 130 and keys != sorted(keys)
    assert_matches_source(epoch, source)
    assert verify_shards(tmp_path).ok


def test_packed_writer_is_byte_identical(tmp_path: Path, digits: Digits) -> None:
    for name in "ab":
        small_shards(tmp_path / name, digits, num=130, per_shard=50)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir()) and len(files) == 5  # no .tmp left
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_per_sample_format_still_readable(tmp_path: Path, digits: Digits) -> None:
    packed = small_shards(tmp_path / "packed", digits, num=130, per_shard=50)
    png = small_shards(tmp_path / "png", digits, num=130, per_shard=50, per_member=1)
    manifest = load_manifest(png)
    assert manifest["format"] == "per_sample" and manifest["samples_per_member"] == 1
    members = tar_members(png / "digits-train-000000.tar")
    assert len(members) == 100 and sorted(members)[:2] == ["000000.cls", "000000.png"]
    assert verify_shards(png).ok
    edit_manifest(png, format_version=1, format=None, samples_per_member=None)  # as written before packing
    for split in ("train", "valid"):
        assert_same(*[list(build_eval_batches(DataConfig(shards=str(d)), split=split, batch_size=32))
                      for d in (packed, png)])
    for shards in (packed, png):  # the order permutes blocks or samples; either way one epoch = every sample
        cfg = DataConfig(shards=str(shards), num_workers=2, shuffle_buffer=20)
        with build_train_stream(cfg, seed=5, rank=0, world_size=1, batch_size=26) as stream:
            epoch = take(stream, 5)
        assert sorted(keys_of(epoch)) == [f"{i:06d}" for i in range(130)]
        assert_matches_source(epoch, source_of(digits))


def test_default_format_follows_image_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(5)
    for name, shape, layout in (("small", (1, 28, 28), "packed"), ("large", (3, 80, 80), "per_sample")):
        images = rng.integers(0, 256, (5, *shape), dtype=np.uint8)
        manifest = write_shards(tmp_path / name, {"train": (images, labels)}, dataset=name, samples_per_shard=2,
                                meta={})
        assert manifest["format"] == layout and manifest["image_shape"] == list(shape)
        batches = list(build_eval_batches(DataConfig(shards=str(tmp_path / name)), split="train", batch_size=4))
        assert np.array_equal(torch.cat([b["image"] for b in batches]).numpy(), images)  # mode L and RGB png
    with pytest.raises(ValueError, match="samples_per_member must be >= 1"):
        write_shards(tmp_path / "bad", {"train": (images, labels)}, dataset="bad", samples_per_shard=2, meta={},
                     samples_per_member=0)


def test_format_errors_name_the_fix(tmp_path: Path, digits: Digits) -> None:
    small_shards(tmp_path, digits, num=40, per_shard=20)
    cfg = DataConfig(shards=str(tmp_path), num_workers=0)
    edit_manifest(tmp_path, image_shape=[1, 14, 56])
    with pytest.raises(DataError, match=r"digits-train-000000\.tar, block 000000: holds images uint8 .* uint8 "
                                        r"\(1, 14, 56\)"):
        list(build_eval_batches(cfg, split="train", batch_size=8))
    assert "digits-train-000001.tar, block 000020" in verify_shards(tmp_path).summary()
    edit_manifest(tmp_path, image_shape=[1, 28, 28], format="per_sample")
    with pytest.raises(DataError, match=r"key 000000: missing member \.png"):
        list(build_eval_batches(cfg, split="train", batch_size=8))
    edit_manifest(tmp_path, format="zip")
    with pytest.raises(ValueError, match="format 'zip' is unknown"):
        build_train_stream(cfg, seed=0, rank=0, world_size=1, batch_size=8)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["format"] = "packed"
    manifest["splits"]["train"]["shards"][1]["num_samples"] = 12  # the tar holds 20: blocks of 16 and 4
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert "digits-train-000001.tar: 2 sample groups, the manifest says 1" in verify_shards(tmp_path).summary()


# ---------------------------------------------------------------- train stream

def epoch_keys(cfg: DataConfig, *, world_size: int, batch_size: int, steps: int, seed: int = 0) -> list[list[dict]]:
    """`steps` batches of every rank of a `world_size` job."""
    runs = []
    for rank in range(world_size):
        with build_train_stream(cfg, seed=seed, rank=rank, world_size=world_size, batch_size=batch_size) as s:
            runs.append(take(s, steps))
    return runs


@pytest.mark.parametrize("num_workers", [0, 2])
def test_equal_batches_per_rank_whatever_the_shard_count(tmp_path: Path, digits: Digits, num_workers: int) -> None:
    small_shards(tmp_path, digits, num=130, per_shard=50)  # 3 shards (50, 50, 30) for 2 ranks x 2 workers
    cfg = DataConfig(shards=str(tmp_path), num_workers=num_workers, shuffle_buffer=30)
    runs = epoch_keys(cfg, world_size=2, batch_size=7, steps=130 // 14)  # one epoch: 9 steps of 14
    assert all(len(b["key"]) == 7 and b["image"].shape == (7, 1, 28, 28) for run in runs for b in run)
    rank0, rank1 = keys_of(runs[0]), keys_of(runs[1])
    assert len(set(rank0)) == len(set(rank1)) == 63 and not set(rank0) & set(rank1)
    assert len(set(rank0) | set(rank1)) == 126  # the 4 left over wait for another epoch
    assert set(rank0) | set(rank1) <= {f"{i:06d}" for i in range(130)}
    assert_matches_source(runs[0] + runs[1], source_of(digits))


def test_same_seed_repeats_other_seeds_differ(tmp_path: Path, digits: Digits) -> None:
    small_shards(tmp_path, digits, num=400, per_shard=50)
    cfg = DataConfig(shards=str(tmp_path), num_workers=2, shuffle_buffer=64)
    a, b = (epoch_keys(cfg, world_size=2, batch_size=16, steps=4, seed=3)[0] for _ in range(2))
    batch = a[0]
    assert batch["image"].dtype == torch.uint8 and batch["label"].shape == (16,)
    assert batch["label"].dtype == torch.int64
    assert_same(a, b)
    assert keys_of(a) != keys_of(epoch_keys(cfg, world_size=2, batch_size=16, steps=4, seed=4)[0])
    in_process = epoch_keys(DataConfig(shards=str(tmp_path), num_workers=0, shuffle_buffer=64), world_size=2,
                            batch_size=16, steps=4, seed=3)[0]
    assert_same(a, in_process)  # workers only split the steps: the order does not depend on them


@pytest.mark.parametrize("per_member", [16, 1], ids=["packed", "per_sample"])
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("saved_after", [4, 5])
def test_exact_resume(tmp_path: Path, digits: Digits, num_workers: int, saved_after: int, per_member: int) -> None:
    small_shards(tmp_path, digits, num=130, per_shard=50, per_member=per_member)  # epoch = 5 steps of 24
    cfg = DataConfig(shards=str(tmp_path), num_workers=num_workers, shuffle_buffer=20)
    with build_train_stream(cfg, seed=7, rank=0, world_size=1, batch_size=24) as stream:
        first = take(stream, saved_after)
        state = json.loads(json.dumps(stream.state_dict()))
        rest = take(stream, 8 - saved_after)
    epoch, step = divmod(saved_after, 5)
    assert (state["batches"], state["epoch"], state["pos"]) == (saved_after, epoch, 24 * step)
    with build_train_stream(cfg, seed=7, rank=0, world_size=1, batch_size=24) as resumed:
        resumed.load_state_dict(state)
        assert_same(take(resumed, 8 - saved_after), rest)
        assert resumed.state_dict()["batches"] == 8
    assert len(first) == saved_after


def test_exact_resume_with_two_ranks(tmp_path: Path, digits: Digits) -> None:
    small_shards(tmp_path, digits, num=130, per_shard=50, per_member=1)
    cfg = DataConfig(shards=str(tmp_path), num_workers=2, shuffle_buffer=20)
    for rank in range(2):
        with build_train_stream(cfg, seed=1, rank=rank, world_size=2, batch_size=10) as stream:
            take(stream, 5)
            state = stream.state_dict()
            rest = take(stream, 6)  # crosses the epoch boundary (6 steps of 20 per epoch)
        with build_train_stream(cfg, seed=1, rank=rank, world_size=2, batch_size=10) as resumed:
            resumed.load_state_dict(state)
            assert_same(take(resumed, 6), rest)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_runs_past_epoch_boundaries(tmp_path: Path, digits: Digits, num_workers: int) -> None:
    small_shards(tmp_path, digits, num=130, per_shard=50)
    cfg = DataConfig(shards=str(tmp_path), num_workers=num_workers, shuffle_buffer=16)
    with build_train_stream(cfg, seed=0, rank=0, world_size=1, batch_size=10) as stream:
        keys = keys_of(take(stream, 13 * 4))  # 4 epochs of 13 steps
    epochs = [keys[i:i + 130] for i in range(0, len(keys), 130)]
    assert all(set(e) == {f"{i:06d}" for i in range(130)} for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4  # every epoch reshuffles


def test_resume_on_another_layout_continues_the_epoch(tmp_path: Path, digits: Digits) -> None:
    """2 ranks -> 1 rank -> 2 ranks (and other batch sizes / workers): the epoch is used once, in order."""
    small_shards(tmp_path, digits, num=130, per_shard=50)
    cfg = DataConfig(shards=str(tmp_path), num_workers=0, shuffle_buffer=30)
    used: list[str] = []
    state = None
    for world_size, batch_size, steps, workers in ((2, 8, 3, 0), (1, 16, 2, 2), (2, 4, 3, 0)):
        cfg = DataConfig(shards=str(tmp_path), num_workers=workers, shuffle_buffer=30)
        for rank in range(world_size):
            with build_train_stream(cfg, seed=2, rank=rank, world_size=world_size, batch_size=batch_size) as s:
                if state is not None:
                    s.load_state_dict(state)
                used += keys_of(take(s, steps))
                saved = s.state_dict()
        state = saved
    assert len(used) == 48 + 32 + 24 == len(set(used))  # no sample twice within the epoch
    assert (state["epoch"], state["pos"], state["batches"]) == (0, 104, 8)
    with build_train_stream(cfg, seed=2, rank=0, world_size=1, batch_size=104) as whole:
        assert sorted(keys_of(take(whole, 1))) == sorted(used)  # the same epoch-0 order, any layout


def test_resume_with_another_seed_starts_the_next_epoch(tmp_path: Path, digits: Digits,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    small_shards(tmp_path, digits, num=130, per_shard=50)
    cfg = DataConfig(shards=str(tmp_path), num_workers=0)
    with build_train_stream(cfg, seed=0, rank=0, world_size=1, batch_size=16) as stream:
        take(stream, 3)
        state = stream.state_dict()
    with build_train_stream(cfg, seed=1, rank=0, world_size=1, batch_size=16) as stream:
        with caplog.at_level(logging.WARNING, logger="symeq_dist.data.stream"):
            stream.load_state_dict(state)
        assert stream.position == (1, 0) and stream.state_dict()["batches"] == 3
        with pytest.raises(RuntimeError, match="before the first next"):
            take(stream, 1)
            stream.load_state_dict(state)
    assert "cannot continue; starting epoch 1" in caplog.text
    with pytest.raises(ValueError, match="stream state version 1"):
        build_train_stream(cfg, seed=0, rank=0, world_size=1, batch_size=16).load_state_dict({"version": 1})


# ---------------------------------------------------------------- errors

def test_fewer_samples_than_a_step_names_the_fix(tmp_path: Path, digits: Digits) -> None:
    small_shards(tmp_path, digits, num=30, per_shard=50)
    cfg = DataConfig(shards=str(tmp_path), num_workers=2)
    with pytest.raises(ValueError, match=r"30 samples, fewer than one step of 2 ranks x 16 = 32: lower train"):
        build_train_stream(cfg, seed=0, rank=0, world_size=2, batch_size=16)


def test_missing_manifest_names_the_command(tmp_path: Path) -> None:
    cfg = DataConfig(shards=str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="symeq shards mnist --out"):
        build_train_stream(cfg, seed=0, rank=0, world_size=1, batch_size=8)
    with pytest.raises(FileNotFoundError, match="symeq shards"):
        load_manifest(tmp_path)


def test_bad_split_and_missing_shard(tmp_path: Path, digits: Digits) -> None:
    images, labels = digits
    write_shards(tmp_path, {"train": (images[:20], labels[:20]), "empty": (images[:0], labels[:0])},
                 dataset="digits", samples_per_shard=10, meta={})
    cfg = DataConfig(shards=str(tmp_path), num_workers=0, split="test")
    with pytest.raises(ValueError, match="available splits: train"):
        build_train_stream(cfg, seed=0, rank=0, world_size=1, batch_size=4)
    with pytest.raises(ValueError, match="'empty' has no shards"):
        build_eval_batches(cfg, split="empty", batch_size=4)
    (tmp_path / "digits-train-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"digits-train-000001\.tar"):
        build_eval_batches(cfg, split="train", batch_size=4)


# ---------------------------------------------------------------- transforms

def test_to_float_threshold_and_grey() -> None:
    image = torch.tensor([0, 111, 112, 255], dtype=torch.uint8).view(1, 1, 2, 2)
    binary = to_float(image, DataConfig(binarize_threshold=112))
    assert binary.dtype == torch.float32 and binary.flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    grey = to_float(image, DataConfig(binarize_threshold=None, noise="gaussian"))
    assert torch.allclose(grey.flatten(), torch.tensor([0, 111, 112, 255]) / 255.0)


def test_add_noise_uses_only_the_generator() -> None:
    x = torch.zeros(1000, 1, 28, 28)
    flip = DataConfig(noise="flip", noise_level=0.1)
    torch.manual_seed(1)
    a = add_noise(x, flip, torch.Generator().manual_seed(5))
    torch.manual_seed(2)  # the global RNG must not matter
    b = add_noise(x, flip, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and set(a.unique().tolist()) == {0.0, 1.0}
    assert abs(a.mean().item() - 0.1) < 0.003
    ones = add_noise(torch.ones_like(x), flip, torch.Generator().manual_seed(6))
    assert abs((1 - ones).mean().item() - 0.1) < 0.003
    assert not torch.equal(a, add_noise(x, flip, torch.Generator().manual_seed(6)))
    gauss = add_noise(x, DataConfig(binarize_threshold=None, noise="gaussian", noise_level=0.5),
                      torch.Generator().manual_seed(5))
    assert abs(gauss.std().item() - 0.5) < 0.01 and abs(gauss.mean().item()) < 0.01
    assert add_noise(x, DataConfig(noise="none"), torch.Generator()) is x


def test_shards_survive_a_copy(tmp_path: Path, digits: Digits) -> None:
    """The manifest holds names relative to its directory, so a shard directory can be moved."""
    small_shards(tmp_path / "a", digits, num=40, per_shard=10)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    batches = [list(build_eval_batches(DataConfig(shards=str(tmp_path / d)), split="train", batch_size=16))
               for d in "ab"]
    assert_same(batches[0], batches[1])
