"""The shard set's `manifest.json`: its format version, layouts, and the checked reading of it.

Written by the offline converters (`symeq_dist.datasets`), read here by every training and eval process.
Must not import models, engines or datasets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from symeq_dist.errors import InputError, MissingInput

MANIFEST_NAME = "manifest.json"
# 1: per-sample png + cls; 2: + "format" and "samples_per_member" (packed blocks); 3: per-sample schemas
# (image_format, label, mask); 4: latent shard sets (code member, image_shape null), written only for those, so
# image sets keep version 3 and their conversion plans. Readers accept 1..FORMAT_VERSION.
FORMAT_VERSION = 4
IMAGES_VERSION = 3
PACKED = "packed"  # members <block key>.{images.npy, labels.npy, keys.json}, one block of samples each
PER_SAMPLE = "per_sample"  # members <key>.{png|jpg, cls|attr.npy, seg.png, json}, one sample each
_MANIFEST_KEYS = ("dataset", "image_shape", "splits")


def load_manifest(shards_dir: str | Path) -> dict[str, Any]:
    """Read `<shards_dir>/manifest.json`.

    Raises:
        FileNotFoundError: no manifest; the message names `symeq shards mnist --out DIR`.
        ValueError: the file is not a shard manifest.
    """
    path = Path(shards_dir) / MANIFEST_NAME
    if not path.is_file():
        raise MissingInput(f"no {MANIFEST_NAME} in {shards_dir}: write the shards first, e.g. "
                                f"run `symeq shards mnist --out {shards_dir}`, or set data.shards")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not valid JSON ({err}); rewrite the shards with `symeq shards`") \
            from None
    version = manifest.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InputError(f"{path} has format_version {version!r}; this symeq_dist reads versions up to "
                         f"{FORMAT_VERSION}: update symeq_dist, or rewrite the shards with this version's "
                         "`symeq shards`")
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        raise InputError(f"{path} lacks {missing}; it was not written by `symeq shards`, rewrite the shards")
    return manifest


def split_entries(manifest: dict[str, Any], split: str, *, shards_dir: Path) -> list[dict[str, Any]]:
    """The manifest's shard entries of `split`, each checked to exist on disk (checksums are not read).

    Raises:
        ValueError: unknown split, or a split without shards (the message lists the available splits).
        FileNotFoundError: a listed shard file is missing.
    """
    splits = manifest["splits"]
    available = ", ".join(f"{name} ({len(entry['shards'])} shards)" for name, entry in splits.items())
    if split not in splits or not splits[split]["shards"]:
        problem = "is not in" if split not in splits else "has no shards in"
        raise InputError(f"split '{split}' {problem} {shards_dir / 'manifest.json'}; available splits: "
                         f"{available or 'none'} (set data.split / data.eval_split)")
    entries = splits[split]["shards"]
    for entry in entries:
        if not (shards_dir / entry["name"]).is_file():
            raise MissingInput(f"shard {shards_dir / entry['name']} listed in the manifest is missing; "
                                    "rewrite the shards (`symeq shards ...`) or point data.shards elsewhere")
    return entries


def samples_per_member(manifest: dict[str, Any]) -> int:
    """1 for per-sample shards, the block size for packed ones; ValueError for an unknown format."""
    layout = manifest.get("format", PER_SAMPLE)
    if layout not in (PACKED, PER_SAMPLE):
        raise InputError(f"manifest format {layout!r} is unknown (this reader knows {PACKED!r} and "
                         f"{PER_SAMPLE!r}); rewrite the shards with `symeq shards ...` or update symeq_dist")
    return int(manifest.get("samples_per_member", 1)) if layout == PACKED else 1
