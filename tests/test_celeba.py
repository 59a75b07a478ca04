"""The CelebA and CelebAMask-HQ converters on miniature trees (real names and text formats, random pixels)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from face_trees import (
    HQ_BOUNDARY,
    LAST_TRAIN,
    LAST_VALID,
    RGB_PARTS,
    celeba_table,
    hq_indices,
    hq_table,
    make_celeba_tree,
    make_celebamask_hq_tree,
)
from PIL import Image

from symeq_dist.cli.shards import shards_parser
from symeq_dist.data.schema import Schema, decode
from symeq_dist.datasets.celeba import CELEBA_ATTRIBUTES, write_celeba_shards
from symeq_dist.datasets.celebamask_hq import MASK_CLASSES, OVERLAP_ORDER, build_label_map, write_celebamask_hq_shards
from symeq_dist.datasets.convert import JOURNAL, ConversionError
from tests.conftest import read_shard_groups

CELEBA_N, HQ_N, SIZE = 30, 24, 32
SPLIT_NAMES = ("train", "valid", "test")
CELEBA_OPTIONS = {"size": SIZE, "image_format": "png", "samples_per_shard": 4}
HQ_OPTIONS = {"size": SIZE, "image_format": "png", "samples_per_shard": 5}


# ---------------------------------------------------------------- helpers

def decoded(out: Path) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """manifest, and split -> samples in key order, each decoded against the manifest schema plus its json meta."""
    manifest, splits = read_shard_groups(out)
    schema = Schema.from_manifest(manifest)
    return manifest, {split: [{**decode(groups[key], schema, f"{split}/{key}"), "meta": json.loads(groups[key]["json"]),
                               "members": sorted(groups[key])} for key in sorted(groups)]
                      for split, groups in splits.items()}


def tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def copy_tree(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "tree"))


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (old, path)
    path.write_text(text.replace(old, new, 1))


def resized(array: np.ndarray, resample: Image.Resampling) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, SIZE, SIZE) with PIL."""
    return np.asarray(Image.fromarray(array).resize((SIZE, SIZE), resample)).transpose(2, 0, 1)


@pytest.fixture(scope="module")
def celeba_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_celeba_tree(tmp_path_factory.mktemp("celeba"), CELEBA_N)


@pytest.fixture(scope="module")
def celeba_out(celeba_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean conversion (workers=1) that other tests compare against."""
    out = tmp_path_factory.mktemp("celeba_shards") / "clean"
    write_celeba_shards(celeba_root, out, workers=1, **CELEBA_OPTIONS)
    return out


@pytest.fixture(scope="module")
def hq_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_celebamask_hq_tree(tmp_path_factory.mktemp("celebamask_hq"), HQ_N)


@pytest.fixture(scope="module")
def hq_out(hq_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hq_shards") / "clean"
    write_celebamask_hq_shards(hq_root, out, workers=1, **HQ_OPTIONS)
    return out


# ---------------------------------------------------------------- CelebA

def test_celeba_splits_and_attributes_round_trip(celeba_root: Path, celeba_out: Path) -> None:
    manifest, samples = decoded(celeba_out)
    table = celeba_table(CELEBA_N)
    expected = {name: sorted(f for f, (_, code) in table.items() if code == i) for i, name in enumerate(SPLIT_NAMES)}
    assert all(expected.values())  # the tree covers all three splits
    assert {s: e["num_samples"] for s, e in manifest["splits"].items()} == {s: len(f) for s, f in expected.items()}
    assert manifest["split_counts"] == {s: len(f) for s, f in expected.items()}
    assert manifest["dataset"] == "celeba" and manifest["image_shape"] == [3, SIZE, SIZE]
    assert manifest["label"] == {"kind": "attributes", "names": list(CELEBA_ATTRIBUTES)} and manifest["mask"] is None
    assert manifest["preprocess"]["crop"] == 148 and manifest["preprocess"]["resample"] == "bicubic"
    sources = {"list_attr_celeba.txt": celeba_root / "Anno", "list_eval_partition.txt": celeba_root / "Eval"}
    assert manifest["source"]["sha256"] == {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
                                            for name, folder in sources.items()}
    for split, files in expected.items():
        assert [s["meta"] for s in samples[split]] == [{"file": f, "split": split} for f in files]  # file-name order
        for sample in samples[split]:
            assert sample["label"].dtype == np.uint8 and sample["members"] == ["attr.npy", "json", "png"]
            np.testing.assert_array_equal(sample["label"], (np.array(table[sample["meta"]["file"]][0]) + 1) // 2)


def test_celeba_centre_crop_and_resize_match_pil(celeba_root: Path, celeba_out: Path, tmp_path: Path) -> None:
    _, samples = decoded(celeba_out)
    name = f"{LAST_VALID:06d}.jpg"
    sample = next(s for s in samples["valid"] if s["meta"]["file"] == name)
    source = np.asarray(Image.open(celeba_root / "Img/img_align_celeba" / name).convert("RGB"))  # (218, 178, 3)
    np.testing.assert_array_equal(sample["image"], resized(source[35:183, 15:163], Image.Resampling.BICUBIC))

    write_celeba_shards(celeba_root, tmp_path / "square", crop=0, limit=1, **CELEBA_OPTIONS)  # largest centred square
    _, samples = decoded(tmp_path / "square")
    source = np.asarray(Image.open(celeba_root / "Img/img_align_celeba/000001.jpg").convert("RGB"))
    np.testing.assert_array_equal(samples["train"][0]["image"], resized(source[20:198], Image.Resampling.BICUBIC))
    assert [len(samples[s]) for s in SPLIT_NAMES] == [1, 1, 1]

    with pytest.raises(ConversionError, match=r"000001\.jpg is 178x218, smaller than the 200-pixel crop; use --crop"):
        write_celeba_shards(celeba_root, tmp_path / "big", crop=200, limit=1, **CELEBA_OPTIONS)


def test_celeba_kaggle_and_crlf_layouts_give_the_same_shards(celeba_out: Path, tmp_path: Path) -> None:
    for variant in ({"kaggle": True}, {"crlf": True}, {"kaggle": True, "crlf": True}):
        name = "_".join(variant)
        root = make_celeba_tree(tmp_path / name, CELEBA_N, **variant)
        manifest = write_celeba_shards(root, tmp_path / f"{name}_out", workers=1, **CELEBA_OPTIONS)
        assert tar_bytes(tmp_path / f"{name}_out") == tar_bytes(celeba_out), variant
        if variant.get("kaggle"):
            assert sorted(manifest["source"]["sha256"]) == ["list_attr_celeba.csv", "list_eval_partition.csv"]
            assert manifest["source"]["image_dir"].endswith("img_align_celeba/img_align_celeba")


def test_celeba_bytes_do_not_depend_on_workers(celeba_root: Path, celeba_out: Path, tmp_path: Path) -> None:
    write_celeba_shards(celeba_root, tmp_path / "w2", workers=2, **CELEBA_OPTIONS)
    assert len(tar_bytes(celeba_out)) == 9  # 10 images per split, 4 per shard
    assert tar_bytes(tmp_path / "w2") == tar_bytes(celeba_out)
    one, two = (json.loads((out / "manifest.json").read_text()) for out in (celeba_out, tmp_path / "w2"))
    one.pop("command")
    two.pop("command")
    assert one == two


def _set_attribute(root: Path) -> None:
    path = root / "Anno/list_attr_celeba.txt"
    lines = path.read_text().split("\n")
    lines[4] = lines[4].replace("-1", " 0", 1) if "-1" in lines[4] else lines[4].replace(" 1", " 0", 1)
    path.write_text("\n".join(lines))


CELEBA_ERRORS: dict[str, tuple[Callable[[Path], Any], type[Exception], str]] = {
    "missing image": (lambda r: (r / "Img/img_align_celeba/000005.jpg").unlink(), FileNotFoundError,
                      r"1 of the 30 images listed in .*list_eval_partition\.txt are missing from .*img_align_celeba: "
                      r"000005\.jpg; unzip"),
    "bad attribute value": (_set_attribute, ValueError,
                            r"list_attr_celeba\.txt line 5: \w+ of 000003\.jpg is '0', not -1 or 1"),
    "unknown partition code": (lambda r: edit(r / "Eval/list_eval_partition.txt", "000002.jpg 0", "000002.jpg 3"),
                               ValueError, r"list_eval_partition\.txt line 2: expected '<file> <code>' with code 0"),
    "count line": (lambda r: edit(r / "Anno/list_attr_celeba.txt", "30\n", "31\n"), ValueError,
                   r"list_attr_celeba\.txt: line 1 says 31 images but 30 rows follow"),
    "attribute names": (lambda r: edit(r / "Anno/list_attr_celeba.txt", "Wavy_Hair", "Curly_Hair"), ValueError,
                        r"list_attr_celeba\.txt: the names line .* columns 34: 'Curly_Hair'"),
    "no partition": (lambda r: (r / "Eval/list_eval_partition.txt").unlink(), FileNotFoundError,
                     r"no list_eval_partition\.txt or list_eval_partition\.csv under .*Eval/list_eval_partition"),
    "images not unzipped": (lambda r: (r / "Img/img_align_celeba").rename(r / "Img/img_align_celeba.zip"),
                            FileNotFoundError, r"no img_align_celeba/ directory holding 000001\.jpg .*download"),
}


@pytest.mark.parametrize("case", list(CELEBA_ERRORS))
def test_celeba_input_errors_name_the_file(case: str, celeba_root: Path, tmp_path: Path) -> None:
    break_tree, error, message = CELEBA_ERRORS[case]
    root = copy_tree(celeba_root, tmp_path)
    break_tree(root)
    with pytest.raises(error, match=message):
        write_celeba_shards(root, tmp_path / "out", **CELEBA_OPTIONS)
    assert not (tmp_path / "out").exists()  # input errors are found before any shard is written


def test_celeba_resumes_after_a_bad_image(celeba_root: Path, celeba_out: Path, tmp_path: Path) -> None:
    root, out = copy_tree(celeba_root, tmp_path), tmp_path / "out"
    bad = root / "Img/img_align_celeba/000009.jpg"  # train index 8: the third shard
    good = bad.read_bytes()
    bad.write_bytes(b"\xff\xd8 not a jpeg at all")
    with pytest.raises(ConversionError, match=r"celeba-train-000002\.tar, key 000008: .*000009\.jpg is not a readable"):
        write_celeba_shards(root, out, workers=1, **CELEBA_OPTIONS)
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}
    assert sorted(finished) == ["celeba-train-000000.tar", "celeba-train-000001.tar"]
    assert (out / JOURNAL).is_dir() and not (out / "manifest.json").exists()

    bad.write_bytes(good)
    write_celeba_shards(root, out, workers=1, **CELEBA_OPTIONS)
    assert {name: (os.stat(out / name).st_ino, os.stat(out / name).st_mtime_ns) for name in finished} == finished
    assert tar_bytes(out) == tar_bytes(celeba_out) and not (out / JOURNAL).exists()


def test_cli_parsers_defaults_and_run(celeba_root: Path, hq_root: Path, tmp_path: Path) -> None:
    parser = shards_parser()
    args = parser.parse_args(["celeba", "ROOT"])
    assert (args.out, args.size, args.crop, args.image_format) == (Path("data_shards/celeba"), 64, 148, "jpg")
    assert (args.samples_per_shard, args.workers, args.limit) == (5000, os.cpu_count(), None)
    args = parser.parse_args(["celebamask-hq", "ROOT"])
    assert (args.out, args.size, args.partition) == (Path("data_shards/celebamask_hq"), 128, None)

    small = ["--size", "16", "--format", "png", "--workers", "1", "--limit", "1"]
    args = parser.parse_args(["celeba", str(celeba_root), "--out", str(tmp_path / "c"), "--crop", "0", *small])
    assert {s: e["num_samples"] for s, e in args.run(args)["splits"].items()} == dict.fromkeys(SPLIT_NAMES, 1)
    args = parser.parse_args(["celebamask-hq", str(hq_root), "--out", str(tmp_path / "h"), "--partition",
                              str(hq_root / "Eval/list_eval_partition.txt"), *small])
    assert args.run(args)["image_shape"] == [3, 16, 16]


# ---------------------------------------------------------------- CelebAMask-HQ

def test_hq_splits_follow_orig_file_not_orig_idx(hq_out: Path) -> None:
    manifest, samples = decoded(hq_out)
    table = hq_table(HQ_N)
    expected = {name: sorted(idx for idx, (_, _, code) in table.items() if code == i)
                for i, name in enumerate(SPLIT_NAMES)}
    assert {s: [x["meta"]["hq_idx"] for x in samples[s]] for s in SPLIT_NAMES} == expected  # idx order per split
    assert manifest["split_counts"] == {s: len(v) for s, v in expected.items()}
    by_file = {x["meta"]["orig_file"]: split for split in SPLIT_NAMES for x in samples[split]}
    # orig_idx = number - 1: an off-by-one lookup would move 162771.jpg to train and 182638.jpg to valid
    assert [by_file[f"{k:06d}.jpg"] for k in HQ_BOUNDARY] == ["train", "valid", "valid", "test"]
    assert HQ_BOUNDARY[1] == LAST_TRAIN + 1
    for split in SPLIT_NAMES:
        for sample in samples[split]:
            number, values, _ = table[sample["meta"]["hq_idx"]]
            assert sample["meta"] == {"hq_idx": sample["meta"]["hq_idx"], "orig_file": f"{number:06d}.jpg",
                                      "split": split}
            np.testing.assert_array_equal(sample["label"], (np.array(values) + 1) // 2)
    assert manifest["mask"] == {"num_classes": 19, "names": list(MASK_CLASSES)}
    assert manifest["label_ids"]["hair"] == 13 and manifest["overlap_order"] == OVERLAP_ORDER
    assert sorted(manifest["source"]["sha256"]) == ["CelebA-HQ-to-CelebA-mapping.txt",
                                                    "CelebAMask-HQ-attribute-anno.txt", "list_eval_partition.txt"]


def test_hq_label_map_overlap_order_and_nearest_resize(hq_root: Path, hq_out: Path) -> None:
    _, samples = decoded(hq_out)
    folder = hq_root / "CelebAMask-HQ-mask-anno/1"  # the second mask folder (idx 2000..3999)

    def exists(idx: int, part: str) -> bool:
        return (folder / f"{idx:05d}_{part}.png").exists()

    # an idx with a part written as RGB and a part left out (not annotated)
    idx = next(i for i in hq_indices(HQ_N) if i >= 2000 and any(exists(i, p) for p in RGB_PARTS)
               and not all(exists(i, p) for p in MASK_CLASSES[1:]))
    sample = next(s for split in SPLIT_NAMES for s in samples[split] if s["meta"]["hq_idx"] == idx)
    present = np.zeros((len(MASK_CLASSES), 512, 512), dtype=bool)  # (K, H, W): part k set at a pixel
    for class_id, part in enumerate(MASK_CLASSES[1:], start=1):
        if exists(idx, part):
            array = np.asarray(Image.open(folder / f"{idx:05d}_{part}.png"))
            present[class_id] = (array[..., 0] if array.ndim == 3 else array) == 255
    # later ids overwrite earlier ones, so a pixel holds the largest id set there (0 where none is)
    full = (present * np.arange(len(MASK_CLASSES))[:, None, None]).max(axis=0).astype(np.uint8)
    skin, hair = MASK_CLASSES.index("skin"), MASK_CLASSES.index("hair")
    hair_over_skin = present[skin] & present[hair] & ~present[hair + 1:].any(axis=0)
    assert hair_over_skin.sum() > 1000 and (full[hair_over_skin] == hair).all()
    np.testing.assert_array_equal(build_label_map(hq_root / "CelebAMask-HQ-mask-anno", idx), full)
    centres = np.arange(SIZE) * (512 // SIZE) + 512 // SIZE // 2  # nearest: the source pixel under each centre
    np.testing.assert_array_equal(sample["mask"], full[np.ix_(centres, centres)])
    source = np.asarray(Image.open(hq_root / f"CelebA-HQ-img/{idx}.jpg").convert("RGB"))
    np.testing.assert_array_equal(sample["image"], resized(source, Image.Resampling.BICUBIC))
    missing = [p for p in MASK_CLASSES[1:] if not exists(idx, p)]
    assert not np.isin(sample["mask"], [MASK_CLASSES.index(p) for p in missing]).any()


def test_hq_without_attributes_has_no_label(hq_root: Path, tmp_path: Path) -> None:
    root = copy_tree(hq_root, tmp_path)
    (root / "CelebAMask-HQ-attribute-anno.txt").unlink()
    manifest = write_celebamask_hq_shards(root, tmp_path / "out", limit=2, **HQ_OPTIONS)
    assert manifest["label"] is None and "CelebAMask-HQ-attribute-anno.txt" not in manifest["source"]["sha256"]
    _, samples = decoded(tmp_path / "out")
    assert all("label" not in s and s["members"] == ["json", "png", "seg.png"] for s in samples["train"])


def _move_partition(root: Path) -> None:
    (root / "Eval/list_eval_partition.txt").rename(root.parent / "list_eval_partition.txt")


def _small_mask(root: Path) -> None:
    Image.new("L", (256, 256), 255).save(root / "CelebAMask-HQ-mask-anno/1/02001_skin.png")


HQ_ERRORS: dict[str, tuple[Callable[[Path], Any], type[Exception], str]] = {
    "no partition": (_move_partition, ValueError, r"pass --partition PATH/list_eval_partition\.txt"),
    "mask of wrong size": (_small_mask, ConversionError, r"02001_skin\.png is 256x256; CelebAMask-HQ part masks"),
    "missing mapping": (lambda r: (r / "CelebA-HQ-to-CelebA-mapping.txt").unlink(), FileNotFoundError,
                        r"CelebA-HQ-to-CelebA-mapping\.txt not found: ROOT must be the unzipped CelebAMask-HQ"),
    "mapping off by one": (lambda r: edit(r / "CelebA-HQ-to-CelebA-mapping.txt", "162770      162771.jpg",
                                          "162771      162771.jpg"), ValueError,
                           r"mapping\.txt line \d+: expected 'idx orig_idx orig_file' with orig_file = orig_idx \+ 1"),
    "missing image": (lambda r: (r / "CelebA-HQ-img/2003.jpg").unlink(), FileNotFoundError,
                      r"1 of the 24 images listed in .*mapping\.txt are missing from .*CelebA-HQ-img: 2003\.jpg"),
    "file not in partition": (lambda r: edit(r / "Eval/list_eval_partition.txt", "162771.jpg 1\n", ""), ValueError,
                              r"162771\.jpg \(CelebA-HQ idx 1 .*\) is not listed in .*list_eval_partition\.txt"),
}


@pytest.mark.parametrize("case", list(HQ_ERRORS))
def test_hq_input_errors_name_the_file(case: str, hq_root: Path, tmp_path: Path) -> None:
    break_tree, error, message = HQ_ERRORS[case]
    root = copy_tree(hq_root, tmp_path)
    break_tree(root)
    with pytest.raises(error, match=message):
        write_celebamask_hq_shards(root, tmp_path / "out", **HQ_OPTIONS)
    if case == "no partition":  # the same tree converts once the list is named
        manifest = write_celebamask_hq_shards(root, tmp_path / "out", partition=tmp_path / "list_eval_partition.txt",
                                              limit=1, **HQ_OPTIONS)
        codes = [code for _, _, code in hq_table(HQ_N).values()]
        assert manifest["split_counts"] == {name: codes.count(i) for i, name in enumerate(SPLIT_NAMES)}
        with pytest.raises(FileNotFoundError, match=r"--partition .*nowhere\.txt not found"):
            write_celebamask_hq_shards(root, tmp_path / "o2", partition=tmp_path / "nowhere.txt", **HQ_OPTIONS)
