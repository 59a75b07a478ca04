"""Miniature CelebA and CelebAMask-HQ trees: the real file names and text formats (DATA.md §3, §4), random pixels.

No face data: images are random noise JPEGs, part masks random ellipses and rectangles (512 x 512, 0/255).
`celeba_table` and `hq_table` return the truth (attributes, split codes, mapping) the trees are written from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from symeq_dist.datasets.celeba import CELEBA_ATTRIBUTES
from symeq_dist.datasets.celebamask_hq import MASK_CLASSES

CELEBA_SIZE = (178, 218)  # W, H of img_align_celeba
HQ_IMAGE_SIZE = 128  # real CelebA-HQ images are 1024 x 1024; the converter only needs square images
MASK_SIZE = 512
LAST_TRAIN, LAST_VALID, LAST_FILE = 162770, 182637, 202599  # 1-based CelebA file numbers of the split ends
# orig_file numbers at the split boundaries: an implementation that uses the 0-based orig_idx (off by one)
# puts 162771.jpg in train and 182638.jpg in valid
HQ_BOUNDARY = (LAST_TRAIN, LAST_TRAIN + 1, LAST_VALID, LAST_VALID + 1)
RGB_PARTS = ("neck", "l_eye")  # written as RGB PNGs (the converter reads channel 0)


def split_code(number: int) -> int:
    """The list_eval_partition code of CelebA file number `number` (1-based)."""
    return 0 if number <= LAST_TRAIN else 1 if number <= LAST_VALID else 2


def celeba_numbers(n: int) -> list[int]:
    """`n` >= 6 file numbers, about a third per split, including both ends of every split."""
    per = n // 3
    train = [*range(1, n - 2 * per), LAST_TRAIN]
    valid = [*range(LAST_TRAIN + 1, LAST_TRAIN + per), LAST_VALID]
    test = [*range(LAST_VALID + 1, LAST_VALID + per), LAST_FILE]
    return train + valid + test


def celeba_table(n: int = 30, seed: int = 0) -> dict[str, tuple[list[int], int]]:
    """file name -> (40 attributes in {-1, 1}, split code) of `make_celeba_tree(root, n, seed=seed)`."""
    values = np.random.default_rng([seed, 0]).choice([-1, 1], size=(n, len(CELEBA_ATTRIBUTES)))
    return {f"{k:06d}.jpg": (row.tolist(), split_code(k)) for k, row in zip(celeba_numbers(n), values, strict=True)}


def make_celeba_tree(root: Path, n: int = 30, *, kaggle: bool = False, crlf: bool = False, seed: int = 0) -> Path:
    """A CelebA copy of `n` noise JPEGs (178 W x 218 H) under `root`; returns `root`.

    Default layout: `Img/img_align_celeba/`, `Anno/list_attr_celeba.txt` (count line, names line, rows with
    double spaces and -1/1) and `Eval/list_eval_partition.txt` ("000001.jpg 0"). `kaggle`: the nested
    `img_align_celeba/img_align_celeba/` plus `list_attr_celeba.csv` / `list_eval_partition.csv`. `crlf` writes
    the text files with CRLF line ends. The pixels depend on `seed` only, never on the layout.
    """
    root = Path(root)
    table = celeba_table(n, seed)
    image_dir = root / ("img_align_celeba/img_align_celeba" if kaggle else "Img/img_align_celeba")
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 1])
    width, height = CELEBA_SIZE
    for name in table:
        noise = rng.integers(0, 256, (height // 2, width // 2, 3), dtype=np.uint8)  # 2x2 blocks survive JPEG better
        Image.fromarray(noise).resize((width, height), Image.Resampling.NEAREST).save(image_dir / name, quality=90)
    newline = "\r\n" if crlf else "\n"
    if kaggle:
        attr = ["image_id," + ",".join(CELEBA_ATTRIBUTES)]
        attr += [f"{name}," + ",".join(map(str, values)) for name, (values, _) in table.items()]
        part = ["image_id,partition", *(f"{name},{code}" for name, (_, code) in table.items())]
        _write_lines(root / "list_attr_celeba.csv", attr, newline)
        _write_lines(root / "list_eval_partition.csv", part, newline)
    else:
        _write_lines(root / "Anno/list_attr_celeba.txt", celeba_attr_lines(table), newline)
        _write_lines(root / "Eval/list_eval_partition.txt", [f"{name} {code}" for name, (_, code) in table.items()],
                     newline)
    return root


def celeba_attr_lines(table: dict[str, tuple[list[int], int]]) -> list[str]:
    """The lines of `list_attr_celeba.txt` / `CelebAMask-HQ-attribute-anno.txt`: count, names (trailing space), rows
    "000001.jpg -1  1  1 -1 ..." (values right-aligned in 2 columns, hence the double spaces)."""
    rows = [f"{name} " + " ".join(f"{v:2d}" for v in values) for name, (values, _) in table.items()]
    return [str(len(table)), " ".join(CELEBA_ATTRIBUTES) + " ", *rows]


def hq_indices(n: int) -> list[int]:
    """`n` CelebA-HQ idx values spread over two mask folders (idx // 2000): 0, 1, ... and 2000, 2001, ..."""
    return [i if i < n // 2 else 2000 + i - n // 2 for i in range(n)]


def hq_table(n: int = 24, seed: int = 0) -> dict[int, tuple[int, list[int], int]]:
    """idx -> (orig_file number, 40 attributes in {-1, 1}, split code) of `make_celebamask_hq_tree(root, n)`.

    The first four idx map to the split boundaries `HQ_BOUNDARY`; the rest to random files of all three splits.
    """
    rng = np.random.default_rng([seed, 2])
    ranges = [(1, LAST_TRAIN), (LAST_TRAIN + 1, LAST_VALID), (LAST_VALID + 1, LAST_FILE)]
    numbers = list(HQ_BOUNDARY)
    while len(numbers) < n:
        low, high = ranges[len(numbers) % 3]
        number = int(rng.integers(low, high + 1))
        if number not in numbers:
            numbers.append(number)
    values = rng.choice([-1, 1], size=(n, len(CELEBA_ATTRIBUTES)))
    return {idx: (k, row.tolist(), split_code(k)) for idx, k, row in zip(hq_indices(n), numbers, values, strict=True)}


def make_celebamask_hq_tree(root: Path, n: int = 24, *, seed: int = 0, attributes: bool = True) -> Path:
    """A CelebAMask-HQ copy of `n` images under `root`, plus CelebA's `Eval/list_eval_partition.txt`; returns `root`.

    Writes `CelebA-HQ-img/{idx}.jpg` (128 x 128 noise), `CelebAMask-HQ-mask-anno/{idx // 2000}/{idx:05d}_{part}.png`
    (512 x 512, 0/255; skin and hair always present and overlapping, other parts only sometimes, `RGB_PARTS` as
    RGB), `CelebA-HQ-to-CelebA-mapping.txt` (header "idx orig_idx orig_file", orig_idx = orig_file - 1) and,
    with `attributes`, `CelebAMask-HQ-attribute-anno.txt`. The partition lists every orig_file and the file
    before it, so an off-by-one lookup finds a (wrong) code instead of failing.
    """
    root = Path(root)
    table = hq_table(n, seed)
    rng = np.random.default_rng([seed, 3])
    (root / "CelebA-HQ-img").mkdir(parents=True, exist_ok=True)
    for idx in table:
        noise = rng.integers(0, 256, (HQ_IMAGE_SIZE, HQ_IMAGE_SIZE, 3), dtype=np.uint8)
        Image.fromarray(noise).save(root / "CelebA-HQ-img" / f"{idx}.jpg", quality=90)
        folder = root / "CelebAMask-HQ-mask-anno" / str(idx // 2000)
        folder.mkdir(parents=True, exist_ok=True)
        for part, mask in random_parts(rng).items():
            image = Image.fromarray(mask)
            (image.convert("RGB") if part in RGB_PARTS else image).save(folder / f"{idx:05d}_{part}.png")
    mapping = [f"{'idx':<12}{'orig_idx':<12}{'orig_file':<12}"]
    mapping += [f"{idx:<12}{k - 1:<12}{f'{k:06d}.jpg':<12}" for idx, (k, _, _) in table.items()]
    _write_lines(root / "CelebA-HQ-to-CelebA-mapping.txt", mapping)
    listed = sorted({m for k, _, _ in table.values() for m in (k - 1, k)})
    _write_lines(root / "Eval/list_eval_partition.txt", [f"{m:06d}.jpg {split_code(m)}" for m in listed])
    if attributes:
        rows = {f"{idx}.jpg": (values, code) for idx, (_, values, code) in table.items()}
        _write_lines(root / "CelebAMask-HQ-attribute-anno.txt", celeba_attr_lines(rows))
    return root


def random_parts(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """part name -> uint8 (512, 512) 0/255 mask: skin (a big ellipse), hair (overlapping skin's top), and each
    other part with probability 0.6 (an ellipse or a rectangle)."""
    parts = {}
    for part in MASK_CLASSES[1:]:
        if part not in ("skin", "hair") and rng.random() > 0.6:
            continue  # not annotated: no file
        image = Image.new("L", (MASK_SIZE, MASK_SIZE), 0)
        draw = ImageDraw.Draw(image)
        if part == "skin":
            draw.ellipse((96, 96, 416, 448), fill=255)
        elif part == "hair":
            draw.ellipse((64, 16, 448, 200), fill=255)
        x, y = rng.integers(0, MASK_SIZE - 40, size=2)
        w, h = rng.integers(24, 160, size=2)
        box = (int(x), int(y), int(min(x + w, MASK_SIZE - 1)), int(min(y + h, MASK_SIZE - 1)))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=255)
        parts[part] = np.asarray(image)
    return parts


def _write_lines(path: Path, lines: list[str], newline: str = "\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((newline.join(lines) + newline).encode("ascii"))
