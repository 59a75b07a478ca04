"""`symeq shards celebamask-hq`: the user's CelebAMask-HQ copy -> faces + 19-class label maps (+ attributes).

Reads the layout of DATA.md §4; splits come from CelebA's partition file through each image's original
file name. Parts are painted in id order (a later id overwrites), masks resized with NEAREST. Offline
code: must not import torch, models or engines.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from symeq_dist.data.schema import Sample, Schema
from symeq_dist.datasets.celeba import (
    CELEBA_ATTRIBUTES,
    PARTITION_FILES,
    RESTORE,
    SPLITS,
    check_listed,
    check_options,
    chw,
    existing_dir,
    find,
    limited,
    open_rgb,
    pick,
    read_attributes,
    read_partition,
    read_rows,
    sha256,
)
from symeq_dist.datasets.convert import convert
from symeq_dist.errors import InputError, MissingInput

MASK_CLASSES = ("background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
                "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth")
MASK_SIZE = 512  # every CelebAMask-HQ part PNG
MASKS_PER_FOLDER = 2000  # CelebAMask-HQ-mask-anno/{idx // 2000}/
OVERLAP_ORDER = "parts painted in id order, later ids overwrite earlier"
HQ_IMAGES, HQ_MASKS = "CelebA-HQ-img", "CelebAMask-HQ-mask-anno"
HQ_MAPPING, HQ_ATTRIBUTES = "CelebA-HQ-to-CelebA-mapping.txt", "CelebAMask-HQ-attribute-anno.txt"


def write_celebamask_hq_shards(root: Path, out_dir: Path, *, partition: Path | None = None, size: int = 128,
                               image_format: str = "jpg", samples_per_shard: int = 2000, workers: int = 1,
                               limit: int | None = None, verify: bool = False) -> dict:
    """Write `celebamask-hq-{train,valid,test}-%06d.tar`: RGB faces, 19-class label maps and, if listed, attributes.

    `root` holds `CelebA-HQ-img/{idx}.jpg` (square), `CelebAMask-HQ-mask-anno/{idx // 2000}/{idx:05d}_{part}.png`
    (512 x 512, absent = part not annotated), `CelebA-HQ-to-CelebA-mapping.txt` and optionally
    `CelebAMask-HQ-attribute-anno.txt`. A split is the code of the image's `orig_file` (1-based CelebA name) in
    `partition` (CelebA's list_eval_partition .txt/.csv; default: searched under `root`), not the official
    script's off-by-one `orig_idx` comparison. Parts (PNG as L or channel 0, > 0 is set) are painted in id order,
    a later id overwriting an earlier one. Images are resized BICUBIC, label maps NEAREST. `limit`, `workers`
    and `samples_per_shard` act as in `write_celeba_shards`.

    Returns:
        The manifest that was written (split counts, source checksums, label ids, overlap order, filters).

    Raises:
        FileNotFoundError: a folder, the mapping file or a listed image is missing (names it and the fix).
        ValueError: no partition list, a malformed text file, an image missing from the partition, or, as
            `ConversionError`, an undecodable image or a part mask that is not 512 x 512.
    """
    root = existing_dir(root, f"the CelebAMask-HQ folder (holding {HQ_IMAGES}/, {HQ_MASKS}/ and {HQ_MAPPING})")
    check_options(size=size, crop=0, limit=limit)
    for name in (HQ_MAPPING, HQ_IMAGES, HQ_MASKS):
        if not (root / name).exists():
            raise MissingInput(f"{root / name} not found: ROOT must be the unzipped CelebAMask-HQ folder holding "
                                    f"{HQ_IMAGES}/, {HQ_MASKS}/ and {HQ_MAPPING}")
    mapping = read_hq_mapping(root / HQ_MAPPING)
    part_path = _hq_partition(root, partition)
    codes = read_partition(part_path)
    attr_path = root / HQ_ATTRIBUTES
    attributes = read_attributes(attr_path) if attr_path.is_file() else None
    splits = _hq_splits(root, mapping, codes, part_path, attributes)
    checked = [p for p in (root / HQ_MAPPING, attr_path, part_path) if p.is_file()]
    meta = {"source": {"root": str(root), "sha256": {p.name: sha256(p) for p in checked}},
            "split_counts": {split: len(records) for split, records in splits.items()},
            "split_rule": "orig_file (1-based CelebA file name) looked up in list_eval_partition",
            "label_ids": {name: i for i, name in enumerate(MASK_CLASSES)}, "overlap_order": OVERLAP_ORDER,
            "preprocess": {"size": size, "image_resample": "bicubic", "mask_resample": "nearest",
                           "part_mask": f"{MASK_SIZE}x{MASK_SIZE} PNG as L (or channel 0), > 0 is set"},
            "limit": limit}
    schema = Schema((3, size, size), image_format, mask_classes=MASK_CLASSES,
                    attributes=None if attributes is None else tuple(CELEBA_ATTRIBUTES))
    return convert(out_dir, dataset="celebamask-hq", splits=limited(splits, limit), schema=schema,
                   make_sample=functools.partial(make_celebamask_hq_sample, root=str(root), size=size),
                   samples_per_shard=samples_per_shard, workers=workers, meta=meta,
                   verify=verify)

def make_celebamask_hq_sample(record: list[Any], *, root: str, size: int) -> Sample:
    """[idx, orig_file, split, attributes or None] -> BICUBIC image and NEAREST label map, both size x size."""
    idx, orig_file, split, attributes = record
    path = Path(root) / HQ_IMAGES / f"{idx}.jpg"
    image = open_rgb(path)
    if image.width != image.height:
        raise InputError(f"{path} is {image.width}x{image.height}; CelebA-HQ images are square (1024x1024): {RESTORE}")
    label_map = build_label_map(Path(root) / HQ_MASKS, idx)
    mask = np.asarray(Image.fromarray(label_map).resize((size, size), Image.Resampling.NEAREST))
    return Sample(image=chw(image.resize((size, size), Image.Resampling.BICUBIC)), mask=mask,
                  label=None if attributes is None else np.asarray(attributes, dtype=np.uint8),
                  meta={"hq_idx": idx, "orig_file": orig_file, "split": split})

def build_label_map(mask_dir: Path, idx: int) -> np.ndarray:
    """uint8 (512, 512) ids of `MASK_CLASSES`: the present part PNGs of `idx` painted in id order (later wins)."""
    label_map = np.zeros((MASK_SIZE, MASK_SIZE), dtype=np.uint8)
    folder = Path(mask_dir) / str(idx // MASKS_PER_FOLDER)
    for class_id, part in enumerate(MASK_CLASSES[1:], start=1):
        path = folder / f"{idx:05d}_{part}.png"
        if path.is_file():  # an absent file means the part is not annotated
            label_map[_read_part(path)] = class_id
    return label_map

def _read_part(path: Path) -> np.ndarray:
    """bool (512, 512): a part PNG read as L (channel 0 of RGB), > 0."""
    try:
        with Image.open(path) as opened:
            if opened.size != (MASK_SIZE, MASK_SIZE):
                raise InputError(f"{path} is {opened.width}x{opened.height}; CelebAMask-HQ part masks are "
                                 f"{MASK_SIZE}x{MASK_SIZE}: {RESTORE}")
            array = np.asarray(opened if opened.mode in ("L", "LA", "RGB", "RGBA") else opened.convert("L"))
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise InputError(f"{path} is not a readable PNG ({type(err).__name__}: {err}); {RESTORE}") from None
    return (array[..., 0] if array.ndim == 3 else array) > 0

def read_hq_mapping(path: Path) -> list[tuple[int, str]]:
    """[(idx, orig_file)] sorted by idx from `CelebA-HQ-to-CelebA-mapping.txt` (header "idx orig_idx orig_file",
    rows like "0 119613 119614.jpg"; orig_idx is 0-based, orig_file 1-based: checked on every row)."""
    rows, fix = read_rows(path), f"the file is damaged or is not {HQ_MAPPING}: {RESTORE}"
    if not rows or rows[0][1] != ["idx", "orig_idx", "orig_file"]:
        raise InputError(f"{path}: line 1 must be the header 'idx orig_idx orig_file'; {fix}")
    mapping: dict[int, str] = {}
    for line, fields in rows[1:]:
        if not (len(fields) == 3 and fields[0].isdigit() and fields[1].isdigit()
                and fields[2] == f"{int(fields[1]) + 1:06d}.jpg"):
            raise InputError(f"{path} line {line}: expected 'idx orig_idx orig_file' with orig_file = orig_idx + 1 as "
                             f"a 6-digit name (e.g. '0 119613 119614.jpg'), got {' '.join(fields)!r}; {fix}")
        if int(fields[0]) in mapping:
            raise InputError(f"{path} line {line}: idx {fields[0]} is listed twice; {fix}")
        mapping[int(fields[0])] = fields[2]
    if not mapping:
        raise InputError(f"{path} lists no image; {fix}")
    return sorted(mapping.items())

def _hq_partition(root: Path, partition: Path | None) -> Path:
    if partition is not None:
        if not Path(partition).is_file():
            raise MissingInput(f"--partition {partition} not found; pass CelebA's Eval/list_eval_partition.txt "
                                    "(or Kaggle's list_eval_partition.csv)")
        return Path(partition)
    found = find(root, PARTITION_FILES, skip=(HQ_IMAGES, HQ_MASKS))
    if not any(found.values()):
        raise InputError(f"no list_eval_partition.txt under {root}: CelebAMask-HQ does not ship CelebA's split; pass "
                         "--partition PATH/list_eval_partition.txt (from CelebA's Eval/ folder)")
    return pick(found, PARTITION_FILES, root, "")

def _hq_splits(root: Path, mapping: list[tuple[int, str]], codes: dict[str, int], part_path: Path,
               attributes: dict[str, list[int]] | None) -> dict[str, list[Any]]:
    """Records [idx, orig_file, split, attributes or None] per split, after checking images and mask folders."""
    check_listed(root / HQ_IMAGES, [f"{idx}.jpg" for idx, _ in mapping], root / HQ_MAPPING, "restore the images")
    for folder in sorted({idx // MASKS_PER_FOLDER for idx, _ in mapping}):
        if not (root / HQ_MASKS / str(folder)).is_dir():
            raise MissingInput(f"{root / HQ_MASKS / str(folder)} not found (masks of idx {folder * 2000}.."
                                    f"{folder * 2000 + 1999}); unzip CelebAMask-HQ completely")
    splits: dict[str, list[Any]] = {name: [] for name in SPLITS.values()}
    for idx, orig_file in mapping:
        if orig_file not in codes:
            raise InputError(f"{orig_file} (CelebA-HQ idx {idx} in {root / HQ_MAPPING}) is not listed in {part_path}; "
                             "pass CelebA's complete list_eval_partition.txt with --partition")
        if attributes is not None and f"{idx}.jpg" not in attributes:
            raise InputError(f"{root / HQ_ATTRIBUTES} has no row for {idx}.jpg; {RESTORE}, or delete it to convert "
                             "without attributes")
        split = SPLITS[codes[orig_file]]
        splits[split].append([idx, orig_file, split, None if attributes is None else attributes[f"{idx}.jpg"]])
    return splits
