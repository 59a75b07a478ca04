"""`symeq shards celeba` / `celebamask-hq`: the user's CelebA and CelebAMask-HQ copies -> per-sample shards.

Reads the layouts of DATA.md §3-§4 (txt annotations, or Kaggle's csv), checks every assumption it relies on
(counts, attribute names and values, partition codes, listed files, mask sizes) before or while converting, and
hands the records to the `convert` engine (parallel, deterministic, resumable). Must not import torch, models
or engines.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from symeq_dist.data.convert import add_conversion_args, convert
from symeq_dist.data.samples import IMAGE_FORMATS, Sample, Schema

log = logging.getLogger(__name__)

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips", "Big_Nose",
    "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses",
    "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick",
    "Wearing_Necklace", "Wearing_Necktie", "Young")
MASK_CLASSES = ("background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
                "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth")
SPLITS = {0: "train", 1: "valid", 2: "test"}  # list_eval_partition codes
MASK_SIZE = 512  # every CelebAMask-HQ part PNG
MASKS_PER_FOLDER = 2000  # CelebAMask-HQ-mask-anno/{idx // 2000}/
OVERLAP_ORDER = "parts painted in id order, later ids overwrite earlier"
ATTR_FILES = ("list_attr_celeba.txt", "list_attr_celeba.csv")
PARTITION_FILES = ("list_eval_partition.txt", "list_eval_partition.csv")
IMAGE_DIR, IMAGE_ZIP = "img_align_celeba", "img_align_celeba.zip"
HQ_IMAGES, HQ_MASKS = "CelebA-HQ-img", "CelebAMask-HQ-mask-anno"
HQ_MAPPING, HQ_ATTRIBUTES = "CelebA-HQ-to-CelebA-mapping.txt", "CelebAMask-HQ-attribute-anno.txt"
_RESTORE = "restore it from the original download"


def write_celeba_shards(root: Path, out_dir: Path, *, size: int = 64, crop: int = 148, image_format: str = "jpg",
                        samples_per_shard: int = 5000, workers: int = 1, limit: int | None = None) -> dict:
    """Write `celeba-{train,valid,test}-%06d.tar`: size x size RGB faces and their 40 attributes (0/1).

    `root` (searched recursively) holds `img_align_celeba/` (Kaggle nests it twice), `list_attr_celeba.txt` or
    `.csv` and `list_eval_partition.txt` or `.csv`. Splits follow the partition codes (0 train, 1 valid, 2 test),
    each in file-name order. Every image is converted to RGB, centre-cropped to `crop` x `crop` at
    ((W - crop) // 2, (H - crop) // 2) (crop 0: the largest centred square) and resized with PIL's BICUBIC
    filter (antialiased when shrinking). `limit` keeps the first `limit` images of each split (quick trials);
    `workers` processes write `samples_per_shard` images per tar, and rerunning after a failure resumes.

    Returns:
        The manifest that was written (source checksums, preprocessing, full split counts).

    Raises:
        FileNotFoundError: a list, the image directory or a listed image is missing (names it and the fix).
        ValueError: a malformed list (names the file and line), a bad option, or, as `ConversionError`, an
            image that does not decode or is smaller than the crop.
    """
    root = _existing_dir(root, "the CelebA folder (holding img_align_celeba/ and the annotation lists)")
    _check_options(size=size, crop=crop, limit=limit)
    found = _find(root, (*ATTR_FILES, *PARTITION_FILES, IMAGE_DIR, IMAGE_ZIP))
    attr_path = _pick(found, ATTR_FILES, root, "CelebA ships it as Anno/list_attr_celeba.txt (Kaggle: .csv)")
    part_path = _pick(found, PARTITION_FILES, root, "CelebA ships it as Eval/list_eval_partition.txt (Kaggle: .csv)")
    attributes, partition = read_attributes(attr_path), read_partition(part_path)
    if set(attributes) != set(partition):
        odd = sorted(set(attributes) ^ set(partition))
        raise ValueError(f"{attr_path} and {part_path} list different images ({len(odd)} differ, e.g. "
                         f"{', '.join(odd[:3])}); use the two lists of one CelebA copy")
    files = sorted(partition)
    image_dir = _image_dir(found, root, files[0])
    _check_listed(image_dir, files, part_path, "unzip Img/img_align_celeba.zip completely or restore the files")
    splits: dict[str, list[Any]] = {name: [] for name in SPLITS.values()}
    for file in files:
        split = SPLITS[partition[file]]
        splits[split].append([str(image_dir / file), attributes[file], split])
    meta = {"source": {"root": str(root), "image_dir": str(image_dir),
                       "sha256": {p.name: _sha256(p) for p in (attr_path, part_path)}},
            "preprocess": {"crop": crop, "size": size, "resample": "bicubic",
                           "crop_box": "left = (W - crop) // 2, top = (H - crop) // 2; crop 0 = largest square"},
            "split_counts": {split: len(records) for split, records in splits.items()}, "limit": limit}
    schema = Schema((3, size, size), image_format, attributes=tuple(CELEBA_ATTRIBUTES))
    return convert(out_dir, dataset="celeba", splits=_limited(splits, limit), schema=schema,
                   make_sample=functools.partial(make_celeba_sample, size=size, crop=crop),
                   samples_per_shard=samples_per_shard, workers=workers, meta=meta)


def write_celebamask_hq_shards(root: Path, out_dir: Path, *, partition: Path | None = None, size: int = 128,
                               image_format: str = "jpg", samples_per_shard: int = 2000, workers: int = 1,
                               limit: int | None = None) -> dict:
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
    root = _existing_dir(root, f"the CelebAMask-HQ folder (holding {HQ_IMAGES}/, {HQ_MASKS}/ and {HQ_MAPPING})")
    _check_options(size=size, crop=0, limit=limit)
    for name in (HQ_MAPPING, HQ_IMAGES, HQ_MASKS):
        if not (root / name).exists():
            raise FileNotFoundError(f"{root / name} not found: ROOT must be the unzipped CelebAMask-HQ folder holding "
                                    f"{HQ_IMAGES}/, {HQ_MASKS}/ and {HQ_MAPPING}")
    mapping = read_hq_mapping(root / HQ_MAPPING)
    part_path = _hq_partition(root, partition)
    codes = read_partition(part_path)
    attr_path = root / HQ_ATTRIBUTES
    attributes = read_attributes(attr_path) if attr_path.is_file() else None
    splits = _hq_splits(root, mapping, codes, part_path, attributes)
    checked = [p for p in (root / HQ_MAPPING, attr_path, part_path) if p.is_file()]
    meta = {"source": {"root": str(root), "sha256": {p.name: _sha256(p) for p in checked}},
            "split_counts": {split: len(records) for split, records in splits.items()},
            "split_rule": "orig_file (1-based CelebA file name) looked up in list_eval_partition",
            "label_ids": {name: i for i, name in enumerate(MASK_CLASSES)}, "overlap_order": OVERLAP_ORDER,
            "preprocess": {"size": size, "image_resample": "bicubic", "mask_resample": "nearest",
                           "part_mask": f"{MASK_SIZE}x{MASK_SIZE} PNG as L (or channel 0), > 0 is set"},
            "limit": limit}
    schema = Schema((3, size, size), image_format, mask_classes=MASK_CLASSES,
                    attributes=None if attributes is None else tuple(CELEBA_ATTRIBUTES))
    return convert(out_dir, dataset="celebamask-hq", splits=_limited(splits, limit), schema=schema,
                   make_sample=functools.partial(make_celebamask_hq_sample, root=str(root), size=size),
                   samples_per_shard=samples_per_shard, workers=workers, meta=meta)


# ---------------------------------------------------------------- samples (run in worker processes)

def make_celeba_sample(record: list[Any], *, size: int, crop: int) -> Sample:
    """[image path, 40 attributes 0/1, split] -> RGB centre crop `crop` (0: largest square), BICUBIC to `size`."""
    path, attributes, split = record
    image = _open_rgb(Path(path))
    width, height = image.size
    side = min(width, height) if crop == 0 else crop
    if side > min(width, height):
        raise ValueError(f"{path} is {width}x{height}, smaller than the {crop}-pixel crop; use --crop "
                         f"{min(width, height)} or less (0 = the largest centred square)")
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    return Sample(image=_chw(image), label=np.asarray(attributes, dtype=np.uint8),
                  meta={"file": Path(path).name, "split": split})


def make_celebamask_hq_sample(record: list[Any], *, root: str, size: int) -> Sample:
    """[idx, orig_file, split, attributes or None] -> BICUBIC image and NEAREST label map, both size x size."""
    idx, orig_file, split, attributes = record
    path = Path(root) / HQ_IMAGES / f"{idx}.jpg"
    image = _open_rgb(path)
    if image.width != image.height:
        raise ValueError(f"{path} is {image.width}x{image.height}; CelebA-HQ images are square (1024x1024): {_RESTORE}")
    label_map = build_label_map(Path(root) / HQ_MASKS, idx)
    mask = np.asarray(Image.fromarray(label_map).resize((size, size), Image.Resampling.NEAREST))
    return Sample(image=_chw(image.resize((size, size), Image.Resampling.BICUBIC)), mask=mask,
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
                raise ValueError(f"{path} is {opened.width}x{opened.height}; CelebAMask-HQ part masks are "
                                 f"{MASK_SIZE}x{MASK_SIZE}: {_RESTORE}")
            array = np.asarray(opened if opened.mode in ("L", "LA", "RGB", "RGBA") else opened.convert("L"))
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path} is not a readable PNG ({type(err).__name__}: {err}); {_RESTORE}") from None
    return (array[..., 0] if array.ndim == 3 else array) > 0


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path} is not a readable image ({type(err).__name__}: {err}); {_RESTORE}") from None


def _chw(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))  # (3, H, W)


# ---------------------------------------------------------------- annotation files

def _rows(path: Path) -> list[tuple[int, list[str]]]:
    """(1-based line number, fields) of every non-blank line: csv for .csv, else split on any whitespace (CRLF too)."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} cannot be read as text ({err}); {_RESTORE}") from None
    rows = csv.reader(lines) if path.suffix.lower() == ".csv" else (line.split() for line in lines)
    return [(number, [f.strip() for f in row]) for number, row in enumerate(rows, 1) if any(f.strip() for f in row)]


def read_attributes(path: Path) -> dict[str, list[int]]:
    """File name -> 40 attributes in {0, 1} ((v + 1) / 2) from a CelebA attribute list.

    The .txt form has a count line, a line of the 40 names and rows "file v1 .. v40" with v in {-1, 1}; the
    Kaggle .csv form has the header `image_id,<40 names>`. Raises ValueError naming the file and line.
    """
    rows, fix = _rows(path), f"the file is damaged or is not a CelebA attribute list: {_RESTORE}"
    if path.suffix.lower() == ".csv":
        header, body = (rows[0][1] if rows else []), rows[1:]
        if header[:1] != ["image_id"]:
            raise ValueError(f"{path}: line 1 must start with the column image_id; {fix}")
        names = header[1:]
    else:
        if len(rows) < 2 or len(rows[0][1]) != 1 or not rows[0][1][0].isdigit():
            raise ValueError(f"{path}: line 1 must be the image count alone (e.g. 202599); {fix}")
        names, body = rows[1][1], rows[2:]
        if int(rows[0][1][0]) != len(body):
            raise ValueError(f"{path}: line 1 says {rows[0][1][0]} images but {len(body)} rows follow; {fix}")
    if tuple(names) != CELEBA_ATTRIBUTES:
        diff = [f"{i + 1}: {n!r}" for i, (n, e) in enumerate(zip(names, CELEBA_ATTRIBUTES, strict=False)) if n != e]
        raise ValueError(f"{path}: the names line holds {len(names)} names, not CelebA's 40 attributes in order "
                         f"(first differences at columns {', '.join(diff[:3]) or 'none'}); {fix}")
    table: dict[str, list[int]] = {}
    for line, fields in body:
        if len(fields) != 41:
            raise ValueError(f"{path} line {line}: {len(fields)} fields, expected a file name and 40 values; {fix}")
        bad = next((i for i, value in enumerate(fields[1:]) if value not in ("-1", "1")), None)
        if bad is not None:
            raise ValueError(f"{path} line {line}: {CELEBA_ATTRIBUTES[bad]} of {fields[0]} is {fields[bad + 1]!r}, "
                             f"not -1 or 1; {fix}")
        if fields[0] in table:
            raise ValueError(f"{path} line {line}: {fields[0]} is listed twice; {fix}")
        table[fields[0]] = [(int(value) + 1) // 2 for value in fields[1:]]
    return table


def read_partition(path: Path) -> dict[str, int]:
    """File name -> split code (0 train, 1 valid, 2 test) from `list_eval_partition.txt` ("000001.jpg 0") or its
    Kaggle .csv (header `image_id,partition`). Raises ValueError naming the file and line."""
    rows, fix = _rows(path), f"the file is damaged or is not CelebA's list_eval_partition: {_RESTORE}"
    if path.suffix.lower() == ".csv":
        if not rows or rows[0][1] != ["image_id", "partition"]:
            raise ValueError(f"{path}: line 1 must be the header image_id,partition; {fix}")
        rows = rows[1:]
    table: dict[str, int] = {}
    for line, fields in rows:
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise ValueError(f"{path} line {line}: expected '<file> <code>' with code 0 (train), 1 (valid) or 2 "
                             f"(test), got {' '.join(fields)!r}; {fix}")
        if fields[0] in table:
            raise ValueError(f"{path} line {line}: {fields[0]} is listed twice; {fix}")
        table[fields[0]] = int(fields[1])
    if not table:
        raise ValueError(f"{path} lists no image; {fix}")
    return table


def read_hq_mapping(path: Path) -> list[tuple[int, str]]:
    """[(idx, orig_file)] sorted by idx from `CelebA-HQ-to-CelebA-mapping.txt` (header "idx orig_idx orig_file",
    rows like "0 119613 119614.jpg"; orig_idx is 0-based, orig_file 1-based: checked on every row)."""
    rows, fix = _rows(path), f"the file is damaged or is not {HQ_MAPPING}: {_RESTORE}"
    if not rows or rows[0][1] != ["idx", "orig_idx", "orig_file"]:
        raise ValueError(f"{path}: line 1 must be the header 'idx orig_idx orig_file'; {fix}")
    mapping: dict[int, str] = {}
    for line, fields in rows[1:]:
        if not (len(fields) == 3 and fields[0].isdigit() and fields[1].isdigit()
                and fields[2] == f"{int(fields[1]) + 1:06d}.jpg"):
            raise ValueError(f"{path} line {line}: expected 'idx orig_idx orig_file' with orig_file = orig_idx + 1 as "
                             f"a 6-digit name (e.g. '0 119613 119614.jpg'), got {' '.join(fields)!r}; {fix}")
        if int(fields[0]) in mapping:
            raise ValueError(f"{path} line {line}: idx {fields[0]} is listed twice; {fix}")
        mapping[int(fields[0])] = fields[2]
    if not mapping:
        raise ValueError(f"{path} lists no image; {fix}")
    return sorted(mapping.items())


# ---------------------------------------------------------------- finding files

def _find(root: Path, names: tuple[str, ...], *, skip: tuple[str, ...] = ()) -> dict[str, list[Path]]:
    """Every file or directory under `root` named one of `names` (sorted paths); directories in `skip` are not
    entered."""
    found: dict[str, list[Path]] = {name: [] for name in names}
    for here, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith("."))
        for name in (*dirs, *files):
            if name in found:
                found[name].append(Path(here) / name)
    return {name: sorted(paths) for name, paths in found.items()}


def _pick(found: dict[str, list[Path]], names: tuple[str, ...], root: Path, fix: str) -> Path:
    """The one file named `names[0]`, else `names[1]`, ...; several copies of it are an error."""
    for name in names:
        paths = [p for p in found[name] if p.is_file()]
        if len(paths) > 1:
            raise ValueError(f"{root} holds {len(paths)} copies of {name} ({', '.join(map(str, paths[:3]))}); "
                             "keep one, or pass a ROOT that holds one CelebA copy")
        if paths:
            return paths[0]
    raise FileNotFoundError(f"no {' or '.join(names)} under {root}; {fix}")


def _image_dir(found: dict[str, list[Path]], root: Path, first: str) -> Path:
    """The `img_align_celeba/` directory that directly holds `first` (Kaggle nests one inside another)."""
    dirs = [d for d in found[IMAGE_DIR] if (d / first).is_file()]
    if not dirs:
        zips = [p for p in found[IMAGE_ZIP] if p.is_file()]
        hint = f"unzip {zips[0]} where it lies" if zips else "download Img/img_align_celeba.zip and unzip it under ROOT"
        raise FileNotFoundError(f"no {IMAGE_DIR}/ directory holding {first} under {root}; {hint}")
    if len(dirs) > 1:
        log.warning("%d %s/ directories hold %s; using %s", len(dirs), IMAGE_DIR, first, dirs[0])
    return dirs[0]


def _hq_partition(root: Path, partition: Path | None) -> Path:
    if partition is not None:
        if not Path(partition).is_file():
            raise FileNotFoundError(f"--partition {partition} not found; pass CelebA's Eval/list_eval_partition.txt "
                                    "(or Kaggle's list_eval_partition.csv)")
        return Path(partition)
    found = _find(root, PARTITION_FILES, skip=(HQ_IMAGES, HQ_MASKS))
    if not any(found.values()):
        raise ValueError(f"no list_eval_partition.txt under {root}: CelebAMask-HQ does not ship CelebA's split; pass "
                         "--partition PATH/list_eval_partition.txt (from CelebA's Eval/ folder)")
    return _pick(found, PARTITION_FILES, root, "")


def _hq_splits(root: Path, mapping: list[tuple[int, str]], codes: dict[str, int], part_path: Path,
               attributes: dict[str, list[int]] | None) -> dict[str, list[Any]]:
    """Records [idx, orig_file, split, attributes or None] per split, after checking images and mask folders."""
    _check_listed(root / HQ_IMAGES, [f"{idx}.jpg" for idx, _ in mapping], root / HQ_MAPPING, "restore the images")
    for folder in sorted({idx // MASKS_PER_FOLDER for idx, _ in mapping}):
        if not (root / HQ_MASKS / str(folder)).is_dir():
            raise FileNotFoundError(f"{root / HQ_MASKS / str(folder)} not found (masks of idx {folder * 2000}.."
                                    f"{folder * 2000 + 1999}); unzip CelebAMask-HQ completely")
    splits: dict[str, list[Any]] = {name: [] for name in SPLITS.values()}
    for idx, orig_file in mapping:
        if orig_file not in codes:
            raise ValueError(f"{orig_file} (CelebA-HQ idx {idx} in {root / HQ_MAPPING}) is not listed in {part_path}; "
                             "pass CelebA's complete list_eval_partition.txt with --partition")
        if attributes is not None and f"{idx}.jpg" not in attributes:
            raise ValueError(f"{root / HQ_ATTRIBUTES} has no row for {idx}.jpg; {_RESTORE}, or delete it to convert "
                             "without attributes")
        split = SPLITS[codes[orig_file]]
        splits[split].append([idx, orig_file, split, None if attributes is None else attributes[f"{idx}.jpg"]])
    return splits


def _check_listed(folder: Path, files: list[str], listing: Path, fix: str) -> None:
    present = set(os.listdir(folder))
    missing = [name for name in files if name not in present]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{len(missing)} of the {len(files)} images listed in {listing} are missing from "
                                f"{folder}: {shown}; {fix}")


def _existing_dir(root: Path, what: str) -> Path:
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; ROOT must be {what}")
    return root


def _check_options(*, size: int, crop: int, limit: int | None) -> None:
    if size < 1:
        raise ValueError(f"size must be >= 1 pixel, got {size}")
    if crop < 0:
        raise ValueError(f"crop must be >= 0 pixels (0 = the largest centred square), got {crop}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for every image), got {limit}")


def _limited(splits: dict[str, list[Any]], limit: int | None) -> dict[str, list[Any]]:
    return splits if limit is None else {split: records[:limit] for split, records in splits.items()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- command line

def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `celeba` and `celebamask-hq` to the `symeq shards` converters; `args.run(args)` writes the shards."""
    celeba = sub.add_parser(
        "celeba", help="your CelebA copy: aligned faces + 40 attributes, official train/valid/test split",
        description="Expects ROOT to hold (searched recursively) img_align_celeba/000001.jpg ... (Kaggle: "
                    "img_align_celeba/img_align_celeba/), list_attr_celeba.txt or .csv and list_eval_partition.txt "
                    "or .csv. Centre crop, bicubic resize; labels are the 40 attributes (0/1).")
    celeba.add_argument("root", type=Path, help="the CelebA folder (e.g. with Img/, Anno/, Eval/) or a Kaggle copy")
    _add_common(celeba, out="data_shards/celeba", size=64, samples_per_shard=5000)
    celeba.add_argument("--crop", type=int, default=148,
                        help="centre crop side before the resize, <= 178 (default 148; 0 = largest centred square)")
    celeba.set_defaults(run=_run_celeba)
    hq = sub.add_parser(
        "celebamask-hq", help="your CelebAMask-HQ copy: faces + 19-class label maps (+ attributes)",
        description=f"Expects ROOT to hold {HQ_IMAGES}/{{idx}}.jpg, {HQ_MASKS}/{{idx//2000}}/{{idx:05d}}_{{part}}.png "
                    f"(512x512), {HQ_MAPPING} and optionally {HQ_ATTRIBUTES}; splits come from CelebA's "
                    "list_eval_partition.txt (--partition). Parts are painted in id order (later overwrites).")
    hq.add_argument("root", type=Path, help="the unzipped CelebAMask-HQ folder")
    _add_common(hq, out="data_shards/celebamask_hq", size=128, samples_per_shard=2000)
    hq.add_argument("--partition", type=Path, default=None,
                    help="CelebA's Eval/list_eval_partition.txt (or .csv); default: searched under ROOT")
    hq.set_defaults(run=_run_celebamask_hq)


def _add_common(parser: argparse.ArgumentParser, *, out: str, size: int, samples_per_shard: int) -> None:
    parser.add_argument("--out", type=Path, default=Path(out), help=f"output dir (default {out})")
    parser.add_argument("--size", type=int, default=size, help=f"output height = width in pixels (default {size})")
    parser.add_argument("--format", dest="image_format", choices=IMAGE_FORMATS, default="jpg",
                        help="per-sample image: jpg (quality 95, default) or png (lossless)")
    add_conversion_args(parser, samples_per_shard=samples_per_shard)
    parser.add_argument("--limit", type=int, default=None, help="convert only the first N images of each split")


def _run_celeba(args: argparse.Namespace) -> dict:
    return write_celeba_shards(args.root, args.out, size=args.size, crop=args.crop, image_format=args.image_format,
                               samples_per_shard=args.samples_per_shard, workers=args.workers, limit=args.limit)


def _run_celebamask_hq(args: argparse.Namespace) -> dict:
    return write_celebamask_hq_shards(args.root, args.out, partition=args.partition, size=args.size,
                                      image_format=args.image_format, samples_per_shard=args.samples_per_shard,
                                      workers=args.workers, limit=args.limit)
