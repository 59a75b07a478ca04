"""The `folder` and `digits-seg` converters: real tar shards written by `convert`, read back with tarfile."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from symeq_dist.cli.main import main
from symeq_dist.cli.shards import shards_parser
from symeq_dist.data import verify_shards
from symeq_dist.data.schema import Schema, decode
from symeq_dist.datasets.convert import ConversionError
from symeq_dist.datasets.digits_seg import CanvasSampler, write_digits_seg_shards
from symeq_dist.datasets.folder import write_folder_shards
from symeq_dist.datasets.mnist import FASHION_MNIST_DIR, read_idx, read_mnist_5k, stratified_split
from tests.conftest import read_shard_groups

# class folder -> [(relative name, (width, height))]; sizes differ, so crops differ per image
TREE = {"birds": [("b1.png", (40, 30)), ("nested/b2.jpg", (33, 47))],
        "cats": [("c1.JPG", (50, 50)), ("c2.png", (21, 64)), ("c3.webp", (36, 24))],
        "dogs": [("d1.jpeg", (64, 40)), ("d2.bmp", (30, 30)), ("d3.PNG", (45, 28))]}
NUM_IMAGES = sum(len(v) for v in TREE.values())


# ---------------------------------------------------------------- helpers

def decoded(out: Path) -> tuple[dict[str, Any], dict[str, dict[str, dict[str, Any]]]]:
    """manifest, and split -> key -> decoded sample (image, label, mask) plus its `json` meta."""
    manifest, splits = read_shard_groups(out)
    schema = Schema.from_manifest(manifest)
    samples = {split: {key: {**decode(members, schema, f"{split}/{key}"),
                             "meta": json.loads(members["json"]) if "json" in members else None}
                       for key, members in groups.items()} for split, groups in splits.items()}
    return manifest, samples


def tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 class folders of PNG / JPEG / WebP / BMP images of different sizes, plus hidden and non-image files."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for cls, files in TREE.items():
        for name, (width, height) in files:
            path = root / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    Image.new("RGB", (8, 8)).save(root / ".hidden.png")  # hidden: ignored, even in the root with labels
    Image.new("RGB", (8, 8)).save(root / "cats" / ".thumb.png")
    (root / "dogs" / ".cache").mkdir()
    Image.new("RGB", (8, 8)).save(root / "dogs" / ".cache" / "x.png")
    (root / "dogs" / "notes.txt").write_text("not an image")
    return root


def expected_image(path: Path, *, size: int, crop: str, mode: str) -> np.ndarray:
    """Independent preprocessing: numpy centre crop of the shorter side, PIL bicubic resize; (C, H, W)."""
    array = np.asarray(Image.open(path).convert(mode))
    if crop == "center":
        height, width = array.shape[:2]
        side = min(width, height)
        top, left = (height - side) // 2, (width - side) // 2
        array = array[top:top + side, left:left + side]
    out = np.asarray(Image.fromarray(array).resize((size, size), Image.Resampling.BICUBIC))
    return out[None] if out.ndim == 2 else out.transpose(2, 0, 1)


# ---------------------------------------------------------------- folder

def test_folder_labels_split_and_centre_crop(image_tree: Path, tmp_path: Path) -> None:
    manifest, samples = decoded_folder(image_tree, tmp_path / "out", labels=True, valid_fraction=0.25)
    assert manifest["class_names"] == ["birds", "cats", "dogs"]
    assert manifest["label"] == {"kind": "class", "num_classes": 3}
    assert manifest["image_shape"] == [3, 16, 16] and manifest["source"]["num_files"] == NUM_IMAGES
    assert manifest["preprocess"] == {"crop": "center", "size": 16, "resample": "bicubic", "mode": "RGB",
                                      "exif_transpose": True}
    # one valid image per class (round(0.25 * n) clamped to 1..n-1), the rest train
    assert {s: e["num_samples"] for s, e in manifest["splits"].items()} == {"train": NUM_IMAGES - 3, "valid": 3}
    files = {}
    for split, groups in samples.items():
        for sample in groups.values():
            rel = sample["meta"]["file"]
            files[rel] = split
            assert sample["label"] == manifest["class_names"].index(rel.split("/")[0])
    assert sorted(files) == sorted(f"{cls}/{name}" for cls, items in TREE.items() for name, _ in items)
    assert sorted(manifest["class_names"].index(f.split("/")[0]) for f, s in files.items() if s == "valid") == [0, 1, 2]
    png = next(s for s in samples["train"].values() if s["meta"]["file"].endswith("c2.png"))
    assert png["meta"]["source_size"] == [21, 64]
    np.testing.assert_array_equal(png["image"], expected_image(image_tree / "cats/c2.png", size=16, crop="center",
                                                               mode="RGB"))


def test_folder_grey_without_crop(image_tree: Path, tmp_path: Path) -> None:
    manifest, samples = decoded_folder(image_tree, tmp_path / "out", grey=True, crop="none")
    assert manifest["image_shape"] == [1, 16, 16] and manifest["label"] is None
    assert manifest["class_names"] is None and list(samples) == ["train"]
    assert len(samples["train"]) == NUM_IMAGES
    for sample in samples["train"].values():
        assert "label" not in sample
        source = image_tree / sample["meta"]["file"]
        if source.suffix.lower() in (".png", ".bmp"):  # lossless sources: exact
            np.testing.assert_array_equal(sample["image"], expected_image(source, size=16, crop="none", mode="L"))


def decoded_folder(root: Path, out: Path, **options: Any) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    write_folder_shards(root, out, size=16, image_format="png", samples_per_shard=3, **options)
    return decoded(out)


def test_folder_errors_name_the_file_and_the_fix(image_tree: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(empty / "sub" / ".only-hidden.png")
    with pytest.raises(FileNotFoundError, match=f"no images .* under {empty}"):
        write_folder_shards(empty, tmp_path / "o1", size=8)
    with pytest.raises(FileNotFoundError, match="not found"):
        write_folder_shards(tmp_path / "missing", tmp_path / "o1", size=8)
    with pytest.raises(ValueError, match="crop 'middle' is unknown"):
        write_folder_shards(image_tree, tmp_path / "o1", size=8, crop="middle")

    loose = tmp_path / "loose"
    (loose / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(loose / "a" / "x.png")
    Image.new("RGB", (8, 8)).save(loose / "stray.png")
    with pytest.raises(ValueError, match=r"directly in it: stray\.png; move them"):
        write_folder_shards(loose, tmp_path / "o2", size=8, labels=True)

    (loose / "a" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(ConversionError, match=r"folder-train-000000\.tar, key 00000\d: .*a/broken\.png is not a "
                                              r"readable image"):
        write_folder_shards(loose, tmp_path / "o3", size=8)


def test_folder_bytes_do_not_depend_on_workers(image_tree: Path, tmp_path: Path) -> None:
    kwargs = {"size": 12, "labels": True, "valid_fraction": 0.3, "samples_per_shard": 2, "seed": 3}
    one = write_folder_shards(image_tree, tmp_path / "w1", workers=1, **kwargs)
    two = write_folder_shards(image_tree, tmp_path / "w2", workers=2, **kwargs)
    assert len(tar_bytes(tmp_path / "w1")) >= 4
    assert tar_bytes(tmp_path / "w1") == tar_bytes(tmp_path / "w2")
    assert one["splits"] == two["splits"] and one["source"] == two["source"]


# ---------------------------------------------------------------- digits-seg

SEG = {"num_train": 60, "num_valid": 20}


@pytest.fixture(scope="module")
def seg_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seg") / "w1"
    write_digits_seg_shards(out, samples_per_shard=16, workers=1, **SEG)
    return out


def recompute(meta: dict[str, Any], glyphs: np.ndarray, labels: np.ndarray, *, canvas: int,
              threshold: int) -> tuple[np.ndarray, np.ndarray, set[int], int]:
    """Image, mask, the classes left visible and the number of overwritten pixels, rebuilt from a sample's json
    layout and the source glyphs, pixel by pixel."""
    assert meta["classes"] == [int(labels[i]) for i in meta["glyphs"]]
    image = np.zeros((canvas, canvas), dtype=np.uint8)
    mask = np.zeros((canvas, canvas), dtype=np.uint8)
    owner = np.full((canvas, canvas), -1)
    overwritten = 0
    for number, (index, cls, (x, y, w, h)) in enumerate(zip(meta["glyphs"], meta["classes"], meta["boxes"],
                                                           strict=True)):
        assert (w, h) == (28, 28) and 0 <= x <= canvas - 28 and 0 <= y <= canvas - 28
        for dy in range(h):
            for dx in range(w):
                value = glyphs[index][dy, dx]
                if value >= threshold:
                    overwritten += int(owner[y + dy, x + dx] >= 0)
                    image[y + dy, x + dx], mask[y + dy, x + dx], owner[y + dy, x + dx] = value, cls + 1, number
    visible = {meta["classes"][n] for n in np.unique(owner[owner >= 0])}
    return image, mask, visible, overwritten


def check_seg_samples(samples: dict[str, dict[str, dict[str, Any]]], manifest: dict[str, Any],
                      glyphs: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    canvas, threshold = manifest["canvas"], manifest["threshold"]
    overwritten = 0
    for split, groups in samples.items():
        images, labels = glyphs[split]
        for sample in groups.values():
            meta = sample["meta"]
            assert sample["image"].shape == (1, canvas, canvas) and sample["mask"].shape == (canvas, canvas)
            assert 1 <= len(meta["glyphs"]) <= manifest["max_glyphs"] and "label" not in sample
            image, mask, visible, count = recompute(meta, images, labels, canvas=canvas, threshold=threshold)
            overwritten += count
            np.testing.assert_array_equal(sample["image"][0], image)
            np.testing.assert_array_equal(sample["mask"], mask)
            assert sample["mask"].max() <= 10
            assert ((sample["mask"] > 0) == (sample["image"][0] >= threshold)).all()
            assert (sample["image"][0][sample["mask"] == 0] == 0).all()
            assert {int(v) - 1 for v in np.unique(sample["mask"]) if v} == visible <= set(meta["classes"])
    assert overwritten > 0  # the overwrite rule was exercised


def test_digits_seg_matches_an_independent_recomputation(seg_shards: Path) -> None:
    manifest, samples = decoded(seg_shards)
    assert manifest["dataset"] == "digits-seg" and manifest["threshold"] == 112 and manifest["canvas"] == 64
    assert manifest["mask"]["names"] == ["background", *map(str, range(10))] and manifest["label"] is None
    assert manifest["source"]["sha256"] and "overwrite" in manifest["overwrite_rule"]
    assert {s: len(g) for s, g in samples.items()} == {"train": 60, "valid": 20}
    images, labels = read_mnist_5k()
    check_seg_samples(samples, manifest, {"train": (images, labels), "valid": (images, labels)})
    train, valid = stratified_split(labels, seed=0, num_valid_per_class=50)
    used = {split: {i for s in groups.values() for i in s["meta"]["glyphs"]} for split, groups in samples.items()}
    assert used["train"] <= set(train.tolist()) and used["valid"] <= set(valid.tolist())
    assert any(len(s["meta"]["glyphs"]) == 3 for s in samples["train"].values())


def test_digits_seg_bytes_do_not_depend_on_workers_or_shard_size(seg_shards: Path, tmp_path: Path) -> None:
    write_digits_seg_shards(tmp_path / "w2", samples_per_shard=16, workers=2, **SEG)
    assert tar_bytes(seg_shards) == tar_bytes(tmp_path / "w2")
    write_digits_seg_shards(tmp_path / "s7", samples_per_shard=7, workers=1, **SEG)
    assert len(tar_bytes(tmp_path / "s7")) == 9 + 3
    assert read_shard_groups(seg_shards)[1] == read_shard_groups(tmp_path / "s7")[1]  # every member of every key


def test_digits_seg_fashion_mnist(tmp_path: Path) -> None:
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip(f"{FASHION_MNIST_DIR} is missing: `apt-get install dataset-fashion-mnist` to run this test")
    manifest = write_digits_seg_shards(tmp_path / "out", source="fashion-mnist", num_train=12, num_valid=6,
                                       samples_per_shard=8, canvas=40, max_glyphs=2)
    assert manifest["threshold"] == 50 and manifest["mask"]["names"][:3] == ["background", "T-shirt/top", "Trouser"]
    assert sorted(manifest["source"]["sha256_decompressed"]) == sorted(
        f"{split}-{kind}-ubyte.gz" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1"))
    glyphs = {split: (read_idx(FASHION_MNIST_DIR / f"{stem}-images-idx3-ubyte.gz"),
                      read_idx(FASHION_MNIST_DIR / f"{stem}-labels-idx1-ubyte.gz"))
              for split, stem in (("train", "train"), ("valid", "t10k"))}
    manifest, samples = decoded(tmp_path / "out")
    check_seg_samples(samples, manifest, glyphs)


def test_digits_seg_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        write_digits_seg_shards(tmp_path / "o", source="fashion-mnist", idx_dir=tmp_path / "nowhere")
    (tmp_path / "partial").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.*apt-get install dataset-fashion-mnist"):
        write_digits_seg_shards(tmp_path / "o", source="fashion-mnist", idx_dir=tmp_path / "partial")
    with pytest.raises(ValueError, match=r"canvas must be >= 28"):
        write_digits_seg_shards(tmp_path / "o", canvas=20)
    with pytest.raises(ValueError, match=r"threshold must be in 1\.\.255"):
        write_digits_seg_shards(tmp_path / "o", threshold=0)


# ---------------------------------------------------------------- rerunning a finished conversion

RERUN = {"num_train": 20, "num_valid": 8, "samples_per_shard": 8, "workers": 1}  # 3 + 1 shards, 28 canvases
RERUN_ARGS = ["--num-train", "20", "--num-valid", "8", "--samples-per-shard", "8", "--workers", "1"]


def file_ids(out: Path) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime_ns) of every shard and the manifest: a rewritten file gets a new pair."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture
def canvases(monkeypatch: pytest.MonkeyPatch) -> list[list[Any]]:
    """The records that digits-seg's `make_sample` is called with in this process (use workers=1)."""
    calls: list[list[Any]] = []
    original = CanvasSampler.__call__

    def counted(self: CanvasSampler, record: list[Any]) -> Any:
        calls.append(record)
        return original(self, record)

    monkeypatch.setattr(CanvasSampler, "__call__", counted)
    return calls


def test_rerun_of_a_finished_conversion_does_nothing(tmp_path: Path, canvases: list[list[Any]],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "seg"
    first = write_digits_seg_shards(out, **RERUN)
    before, made = file_ids(out), len(canvases)
    canvases[:] = []
    with caplog.at_level(logging.INFO, logger="symeq_dist.datasets.convert"):
        second = write_digits_seg_shards(out, **RERUN)
    assert canvases == [] and made == 28  # not one sample made
    assert file_ids(out) == before and len(before) == 5  # no shard and not the manifest rewritten
    assert f"nothing to do: {out} already holds this conversion (4 shards, 28 samples)" in caplog.text
    assert second == first == json.loads((out / "manifest.json").read_text())
    assert len(first["plan_sha256"]) == 64 and all(entry["size"] == (out / entry["name"]).stat().st_size
                                                   for split in first["splits"].values() for entry in split["shards"])


def test_rerun_keeps_changed_bytes_and_verify_rewrites_exactly_them(tmp_path: Path, canvases: list[list[Any]],
                                                                     capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "seg"
    assert main(["shards", "digits-seg", "--out", str(out), *RERUN_ARGS]) == 0
    good, before, canvases[:] = (out / "digits-seg-train-000001.tar").read_bytes(), file_ids(out), []
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF  # same size, other bytes: only a hash notices
    (out / "digits-seg-train-000001.tar").write_bytes(bad)
    before = {**before, **file_ids(out)}
    capsys.readouterr()
    assert main(["shards", "digits-seg", "--out", str(out), *RERUN_ARGS]) == 0  # size checks only
    assert "nothing to do" in capsys.readouterr().err and canvases == [] and file_ids(out) == before

    assert main(["shards", "digits-seg", "--out", str(out), *RERUN_ARGS, "--verify"]) == 0
    after = file_ids(out)
    assert {name for name in before if after[name] != before[name]} == {"digits-seg-train-000001.tar",
                                                                         "manifest.json"}
    assert canvases == [["train", i] for i in range(8, 16)]  # exactly that shard's records
    assert (out / "digits-seg-train-000001.tar").read_bytes() == good and verify_shards(out).ok

    canvases[:] = []
    assert main(["shards", "digits-seg", "--out", str(out), *RERUN_ARGS, "--verify"]) == 0
    assert "nothing to do" in capsys.readouterr().err and canvases == [] and file_ids(out) == after


def test_rerun_rewrites_missing_shards_and_converts_again_for_other_options(tmp_path: Path,
                                                                             canvases: list[list[Any]]) -> None:
    out = tmp_path / "seg"
    first = write_digits_seg_shards(out, **RERUN)
    (out / "digits-seg-valid-000000.tar").unlink()
    before, canvases[:] = file_ids(out), []
    assert write_digits_seg_shards(out, **RERUN) == first
    assert canvases == [["valid", i] for i in range(8)]  # only the missing shard
    assert {name: ids for name, ids in file_ids(out).items() if name in before and name != "manifest.json"} == \
        {name: ids for name, ids in before.items() if name != "manifest.json"}

    shard = out / "digits-seg-train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-512])  # truncated: `verify` and a plain rerun both notice the size
    assert "digits-seg-train-000000.tar: " in verify_shards(out).summary() and "the manifest says" in \
        verify_shards(out).summary()
    canvases[:] = []
    assert write_digits_seg_shards(out, **RERUN) == first and canvases == [["train", i] for i in range(8)]

    canvases[:] = []
    other = write_digits_seg_shards(out, **{**RERUN, "seed": 1})  # another plan: convert again
    assert len(canvases) == 28 and other["seed"] == 1 and other["plan_sha256"] != first["plan_sha256"]
    assert verify_shards(out).ok


# ---------------------------------------------------------------- command line

def test_subparsers_run_the_writers(image_tree: Path, tmp_path: Path) -> None:
    parser = shards_parser()
    args = parser.parse_args(["folder", str(image_tree), "--size", "8", "--labels", "--format", "png", "--grey",
                              "--workers", "1", "--name", "pets", "--out", str(tmp_path / "pets")])
    manifest = args.run(args)
    assert manifest["dataset"] == "pets" and manifest["image_shape"] == [1, 8, 8] and args.out == tmp_path / "pets"
    default = parser.parse_args(["folder", "x", "--size", "8"])
    assert (default.crop, default.image_format, default.valid_fraction, default.out) == ("center", "jpg", 0.0, None)
    args = parser.parse_args(["digits-seg", "--num-train", "4", "--num-valid", "2", "--canvas", "32",
                              "--workers", "1", "--out", str(tmp_path / "seg")])
    manifest = args.run(args)
    assert manifest["splits"]["train"]["num_samples"] == 4 and manifest["image_shape"] == [1, 32, 32]
    assert parser.parse_args(["digits-seg"]).out == Path("data_shards/digits_seg")
