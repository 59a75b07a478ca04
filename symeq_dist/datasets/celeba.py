"""`symeq shards celeba`: the user's CelebA copy -> per-sample shards (and the annotation readers and file
finders that `celebamask_hq.py` shares).

Reads the layout of DATA.md §3 (txt annotations, or Kaggle's csv), checks every assumption it relies on
(counts, attribute names and values, partition codes, listed files, mask sizes) before or while converting, and
hands the records to the `convert` engine (parallel, deterministic, resumable). Must not import torch, models
or engines.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from symeq_dist.data.schema import Sample, Schema
from symeq_dist.datasets.convert import convert
from symeq_dist.errors import InputError, MissingInput

log = logging.getLogger(__name__)

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips", "Big_Nose",
    "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses",
    "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick",
    "Wearing_Necklace", "Wearing_Necktie", "Young")
SPLITS = {0: "train", 1: "valid", 2: "test"}  # list_eval_partition codes
ATTR_FILES = ("list_attr_celeba.txt", "list_attr_celeba.csv")
PARTITION_FILES = ("list_eval_partition.txt", "list_eval_partition.csv")
IMAGE_DIR, IMAGE_ZIP = "img_align_celeba", "img_align_celeba.zip"
RESTORE = "restore it from the original download"


def write_celeba_shards(root: Path, out_dir: Path, *, size: int = 64, crop: int = 148, image_format: str = "jpg",
                        samples_per_shard: int = 5000, workers: int = 1, limit: int | None = None,
                        verify: bool = False) -> dict:
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
    root = existing_dir(root, "the CelebA folder (holding img_align_celeba/ and the annotation lists)")
    check_options(size=size, crop=crop, limit=limit)
    found = find(root, (*ATTR_FILES, *PARTITION_FILES, IMAGE_DIR, IMAGE_ZIP))
    attr_path = pick(found, ATTR_FILES, root, "CelebA ships it as Anno/list_attr_celeba.txt (Kaggle: .csv)")
    part_path = pick(found, PARTITION_FILES, root, "CelebA ships it as Eval/list_eval_partition.txt (Kaggle: .csv)")
    attributes, partition = read_attributes(attr_path), read_partition(part_path)
    if set(attributes) != set(partition):
        odd = sorted(set(attributes) ^ set(partition))
        raise InputError(f"{attr_path} and {part_path} list different images ({len(odd)} differ, e.g. "
                         f"{', '.join(odd[:3])}); use the two lists of one CelebA copy")
    files = sorted(partition)
    image_dir = _image_dir(found, root, files[0])
    check_listed(image_dir, files, part_path, "unzip Img/img_align_celeba.zip completely or restore the files")
    splits: dict[str, list[Any]] = {name: [] for name in SPLITS.values()}
    for file in files:
        split = SPLITS[partition[file]]
        splits[split].append([str(image_dir / file), attributes[file], split])
    meta = {"source": {"root": str(root), "image_dir": str(image_dir),
                       "sha256": {p.name: sha256(p) for p in (attr_path, part_path)}},
            "preprocess": {"crop": crop, "size": size, "resample": "bicubic",
                           "crop_box": "left = (W - crop) // 2, top = (H - crop) // 2; crop 0 = largest square"},
            "split_counts": {split: len(records) for split, records in splits.items()}, "limit": limit}
    schema = Schema((3, size, size), image_format, attributes=tuple(CELEBA_ATTRIBUTES))
    return convert(out_dir, dataset="celeba", splits=limited(splits, limit), schema=schema,
                   make_sample=functools.partial(make_celeba_sample, size=size, crop=crop),
                   samples_per_shard=samples_per_shard, workers=workers, meta=meta,
                   verify=verify)


# ---------------------------------------------------------------- samples (run in worker processes)

def make_celeba_sample(record: list[Any], *, size: int, crop: int) -> Sample:
    """[image path, 40 attributes 0/1, split] -> RGB centre crop `crop` (0: largest square), BICUBIC to `size`."""
    path, attributes, split = record
    image = open_rgb(Path(path))
    width, height = image.size
    side = min(width, height) if crop == 0 else crop
    if side > min(width, height):
        raise InputError(f"{path} is {width}x{height}, smaller than the {crop}-pixel crop; use --crop "
                         f"{min(width, height)} or less (0 = the largest centred square)")
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    return Sample(image=chw(image), label=np.asarray(attributes, dtype=np.uint8),
                  meta={"file": Path(path).name, "split": split})


def open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"{path} is not a readable image ({type(err).__name__}: {err}); {RESTORE}") from None


def chw(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))  # (3, H, W)


# ---------------------------------------------------------------- annotation files

def read_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(1-based line number, fields) of every non-blank line: csv for .csv, else split on any whitespace (CRLF too)."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path} cannot be read as text ({err}); {RESTORE}") from None
    rows = csv.reader(lines) if path.suffix.lower() == ".csv" else (line.split() for line in lines)
    return [(number, [f.strip() for f in row]) for number, row in enumerate(rows, 1) if any(f.strip() for f in row)]


def read_attributes(path: Path) -> dict[str, list[int]]:
    """File name -> 40 attributes in {0, 1} ((v + 1) / 2) from a CelebA attribute list.

    The .txt form has a count line, a line of the 40 names and rows "file v1 .. v40" with v in {-1, 1}; the
    Kaggle .csv form has the header `image_id,<40 names>`. Raises ValueError naming the file and line.
    """
    rows, fix = read_rows(path), f"the file is damaged or is not a CelebA attribute list: {RESTORE}"
    if path.suffix.lower() == ".csv":
        header, body = (rows[0][1] if rows else []), rows[1:]
        if header[:1] != ["image_id"]:
            raise InputError(f"{path}: line 1 must start with the column image_id; {fix}")
        names = header[1:]
    else:
        if len(rows) < 2 or len(rows[0][1]) != 1 or not rows[0][1][0].isdigit():
            raise InputError(f"{path}: line 1 must be the image count alone (e.g. 202599); {fix}")
        names, body = rows[1][1], rows[2:]
        if int(rows[0][1][0]) != len(body):
            raise InputError(f"{path}: line 1 says {rows[0][1][0]} images but {len(body)} rows follow; {fix}")
    if tuple(names) != CELEBA_ATTRIBUTES:
        diff = [f"{i + 1}: {n!r}" for i, (n, e) in enumerate(zip(names, CELEBA_ATTRIBUTES, strict=False)) if n != e]
        raise InputError(f"{path}: the names line holds {len(names)} names, not CelebA's 40 attributes in order "
                         f"(first differences at columns {', '.join(diff[:3]) or 'none'}); {fix}")
    table: dict[str, list[int]] = {}
    for line, fields in body:
        if len(fields) != 41:
            raise InputError(f"{path} line {line}: {len(fields)} fields, expected a file name and 40 values; {fix}")
        bad = next((i for i, value in enumerate(fields[1:]) if value not in ("-1", "1")), None)
        if bad is not None:
            raise InputError(f"{path} line {line}: {CELEBA_ATTRIBUTES[bad]} of {fields[0]} is {fields[bad + 1]!r}, "
                             f"not -1 or 1; {fix}")
        if fields[0] in table:
            raise InputError(f"{path} line {line}: {fields[0]} is listed twice; {fix}")
        table[fields[0]] = [(int(value) + 1) // 2 for value in fields[1:]]
    return table


def read_partition(path: Path) -> dict[str, int]:
    """File name -> split code (0 train, 1 valid, 2 test) from `list_eval_partition.txt` ("000001.jpg 0") or its
    Kaggle .csv (header `image_id,partition`). Raises ValueError naming the file and line."""
    rows, fix = read_rows(path), f"the file is damaged or is not CelebA's list_eval_partition: {RESTORE}"
    if path.suffix.lower() == ".csv":
        if not rows or rows[0][1] != ["image_id", "partition"]:
            raise InputError(f"{path}: line 1 must be the header image_id,partition; {fix}")
        rows = rows[1:]
    table: dict[str, int] = {}
    for line, fields in rows:
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise InputError(f"{path} line {line}: expected '<file> <code>' with code 0 (train), 1 (valid) or 2 "
                             f"(test), got {' '.join(fields)!r}; {fix}")
        if fields[0] in table:
            raise InputError(f"{path} line {line}: {fields[0]} is listed twice; {fix}")
        table[fields[0]] = int(fields[1])
    if not table:
        raise InputError(f"{path} lists no image; {fix}")
    return table


# ---------------------------------------------------------------- finding files

def find(root: Path, names: tuple[str, ...], *, skip: tuple[str, ...] = ()) -> dict[str, list[Path]]:
    """Every file or directory under `root` named one of `names` (sorted paths); directories in `skip` are not
    entered."""
    found: dict[str, list[Path]] = {name: [] for name in names}
    for here, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d not in skip and not d.startswith("."))
        for name in (*dirs, *files):
            if name in found:
                found[name].append(Path(here) / name)
    return {name: sorted(paths) for name, paths in found.items()}


def pick(found: dict[str, list[Path]], names: tuple[str, ...], root: Path, fix: str) -> Path:
    """The one file named `names[0]`, else `names[1]`, ...; several copies of it are an error."""
    for name in names:
        paths = [p for p in found[name] if p.is_file()]
        if len(paths) > 1:
            raise InputError(f"{root} holds {len(paths)} copies of {name} ({', '.join(map(str, paths[:3]))}); "
                             "keep one, or pass a ROOT that holds one CelebA copy")
        if paths:
            return paths[0]
    raise MissingInput(f"no {' or '.join(names)} under {root}; {fix}")


def _image_dir(found: dict[str, list[Path]], root: Path, first: str) -> Path:
    """The `img_align_celeba/` directory that directly holds `first` (Kaggle nests one inside another)."""
    dirs = [d for d in found[IMAGE_DIR] if (d / first).is_file()]
    if not dirs:
        zips = [p for p in found[IMAGE_ZIP] if p.is_file()]
        hint = f"unzip {zips[0]} where it lies" if zips else "download Img/img_align_celeba.zip and unzip it under ROOT"
        raise MissingInput(f"no {IMAGE_DIR}/ directory holding {first} under {root}; {hint}")
    if len(dirs) > 1:
        log.warning("%d %s/ directories hold %s; using %s", len(dirs), IMAGE_DIR, first, dirs[0])
    return dirs[0]


def check_listed(folder: Path, files: list[str], listing: Path, fix: str) -> None:
    present = set(os.listdir(folder))
    missing = [name for name in files if name not in present]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise MissingInput(f"{len(missing)} of the {len(files)} images listed in {listing} are missing from "
                                f"{folder}: {shown}; {fix}")


def existing_dir(root: Path, what: str) -> Path:
    root = Path(root).resolve()
    if not root.is_dir():
        raise MissingInput(f"{root} is not a directory; ROOT must be {what}")
    return root


def check_options(*, size: int, crop: int, limit: int | None) -> None:
    if size < 1:
        raise InputError(f"size must be >= 1 pixel, got {size}")
    if crop < 0:
        raise InputError(f"crop must be >= 0 pixels (0 = the largest centred square), got {crop}")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1 (or None for every image), got {limit}")


def limited(splits: dict[str, list[Any]], limit: int | None) -> dict[str, list[Any]]:
    return splits if limit is None else {split: records[:limit] for split, records in splits.items()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
