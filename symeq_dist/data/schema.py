"""One sample and its tar members: the contract between the converters (writers) and the stream (reader).

A sample is an image (uint8 (C, H, W), C in {1, 3}), optionally one class id or a 0/1 attribute vector,
optionally a per-pixel label map (uint8 (H, W)), and optional JSON metadata. A latent shard set (the codes a
separately trained prior learns from or the game streams, `symeq prior codes`) holds a float32 code per
sample instead of an image, with the codes' family ("gaussian": real values, "bernoulli": 0/1) in the
manifest. Per-sample tar members:

    <key>.png | <key>.jpg   the image (PNG lossless, mode L or RGB; JPEG at the schema's quality)
    <key>.cls               class id, ASCII                   (schema.num_classes)
    <key>.attr.npy          uint8 (A,) of 0/1                  (schema.attributes, A names)
    <key>.seg.png           label map, PNG mode L, 0..K-1      (schema.mask_classes, K names; id = index)
    <key>.code.npy          float32 code_shape                 (schema.code_shape; latent shard sets)
    <key>.json              metadata (source file, ...), never read by the stream

`Schema` is stored in `manifest.json`; `decode` checks every member against it and raises `BadSample`
naming the shard and key. Must not import torch, models or engines.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from symeq_dist.data.manifest import FORMAT_VERSION, IMAGES_VERSION
from symeq_dist.errors import InputError

IMAGE_FORMATS = ("png", "jpg")
_MEMBERS = {"cls", "attr.npy", "seg.png", "code.npy", "json", *IMAGE_FORMATS}
CODE_FAMILIES = ("gaussian", "bernoulli")


class BadSample(InputError):
    """A sample that cannot be read or breaks the schema; `where` names the shard and key."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where, self.problem = where, problem

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # picklable across worker processes
        return BadSample, (self.where, self.problem)


@dataclass(frozen=True)
class Schema:
    """What every sample of a shard set holds; written to and read from `manifest.json`."""

    image_shape: tuple[int, int, int] | None
    """(C, H, W) with C = 1 (grey, mode L) or 3 (RGB); None for a latent shard set (codes only)."""
    image_format: str = "png"
    """Per-sample image member: png (lossless) or jpg."""
    jpeg_quality: int = 95
    num_classes: int | None = None
    """One class id in 0..num_classes-1 per sample (member `cls`), or None."""
    attributes: tuple[str, ...] | None = None
    """Names of a 0/1 attribute vector per sample (member `attr.npy`), or None."""
    mask_classes: tuple[str, ...] | None = None
    """Names of the label-map ids 0..K-1 (member `seg.png`), or None for no mask."""
    code_shape: tuple[int, ...] | None = None
    """The shape of one latent code (member `code.npy`, float32), or None for no code."""
    code_family: str | None = None
    """The codes' family, "gaussian" (real values) or "bernoulli" (0/1), when there are codes."""

    def __post_init__(self) -> None:
        if self.image_shape is None and self.code_shape is None:
            raise InputError("a schema needs an image_shape or a code_shape")
        if self.image_shape is not None:
            c, h, w = self.image_shape
            if c not in (1, 3) or h < 1 or w < 1:
                raise InputError(f"image_shape must be (C, H, W) with C in {{1, 3}}, got {self.image_shape}")
        if self.code_shape is not None and (not self.code_shape or min(self.code_shape) < 1):
            raise InputError(f"code_shape must be a non-empty shape of positive sizes, got {self.code_shape}")
        if (self.code_shape is None) != (self.code_family is None) or self.code_family not in (None, *CODE_FAMILIES):
            raise InputError(f"codes need both code_shape and code_family ({' or '.join(CODE_FAMILIES)}), got "
                             f"{self.code_shape} and {self.code_family!r}")
        if self.image_shape is None and self.mask_classes is not None:
            raise InputError("a label map needs an image_shape")
        if self.image_format not in IMAGE_FORMATS:
            raise InputError(f"image_format {self.image_format!r}: choose one of {', '.join(IMAGE_FORMATS)}")
        if self.num_classes is not None and self.attributes is not None:
            raise InputError("a schema has class labels or attributes, not both")
        if self.num_classes is not None and self.num_classes < 1:
            raise InputError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.mask_classes is not None and not 2 <= len(self.mask_classes) <= 256:
            raise InputError(f"a label map needs 2..256 classes, got {len(self.mask_classes)}")

    @property
    def label_kind(self) -> str | None:
        """'class', 'attributes' or None."""
        return "class" if self.num_classes is not None else "attributes" if self.attributes is not None else None

    def to_manifest(self) -> dict[str, Any]:
        label = ({"kind": "class", "num_classes": self.num_classes} if self.num_classes is not None else
                 {"kind": "attributes", "names": list(self.attributes)} if self.attributes is not None else None)
        mask = None if self.mask_classes is None else {"num_classes": len(self.mask_classes),
                                                       "names": list(self.mask_classes)}
        out = {"image_shape": None if self.image_shape is None else list(self.image_shape),
               "image_format": self.image_format,
               "jpeg_quality": self.jpeg_quality if self.image_format == "jpg" else None,
               "num_classes": self.num_classes or 0, "label": label, "mask": mask}
        if self.code_shape is not None:  # only then: image sets keep their manifests (and conversion plans)
            out["code"] = {"shape": list(self.code_shape), "family": self.code_family, "dtype": "float32"}
        return out

    @property
    def format_version(self) -> int:
        """The manifest format version of shards of this schema (data.manifest)."""
        return IMAGES_VERSION if self.code_shape is None else FORMAT_VERSION

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> Schema:
        """The schema of a manifest; manifests before the `label` field hold class labels (`num_classes`)."""
        label = manifest.get("label", {"kind": "class", "num_classes": manifest.get("num_classes", 0)})
        mask = manifest.get("mask")
        kind = None if label is None else label.get("kind")
        if kind not in (None, "class", "attributes"):
            raise InputError(f"manifest label kind {kind!r} is unknown (class or attributes); rewrite the shards")
        code = manifest.get("code")
        shape = manifest["image_shape"]
        return cls(image_shape=None if shape is None else tuple(shape),
                   image_format=manifest.get("image_format") or "png",
                   jpeg_quality=manifest.get("jpeg_quality") or 95,
                   num_classes=max(1, int(label["num_classes"])) if kind == "class" else None,
                   attributes=tuple(label["names"]) if kind == "attributes" else None,
                   mask_classes=None if mask is None else tuple(mask["names"]),
                   code_shape=None if code is None else tuple(code["shape"]),
                   code_family=None if code is None else code["family"])


@dataclass
class Sample:
    """What a converter produces for one source record."""

    image: np.ndarray | None
    """uint8 (C, H, W); None in a latent shard set."""
    label: int | np.ndarray | None = None
    """Class id (schema.num_classes), or uint8 (A,) 0/1 attributes (schema.attributes)."""
    mask: np.ndarray | None = None
    """uint8 (H, W) label map (schema.mask_classes)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """JSON metadata, e.g. the source file; stored as the `json` member."""
    code: np.ndarray | None = None
    """float32 code_shape (schema.code_shape)."""


# ---------------------------------------------------------------- encoding (converters)

def encode(sample: Sample, schema: Schema, key: str) -> dict[str, Any]:
    """`sample` -> a webdataset group {"__key__": key, member: bytes}; ValueError if it breaks the schema."""
    group: dict[str, Any] = {"__key__": key}
    image = sample.image
    if schema.image_shape is not None:
        if image is None or image.dtype != np.uint8 or image.shape != tuple(schema.image_shape):
            got = "none" if image is None else f"{image.dtype} {image.shape}"
            raise InputError(f"sample {key}: image {got}, the schema says uint8 {tuple(schema.image_shape)}")
        group[schema.image_format] = _encode_image(image, schema)
    elif image is not None:
        raise InputError(f"sample {key} has an image but the schema has no image_shape (a latent shard set)")
    if schema.code_shape is not None:
        _check_code(sample.code, schema, f"sample {key}")
        group["code.npy"] = _npy(np.ascontiguousarray(sample.code, dtype=np.float32))
    elif sample.code is not None:
        raise InputError(f"sample {key} has a code but the schema has no code_shape")
    _check_label(sample.label, schema, f"sample {key}")
    if schema.num_classes is not None:
        group["cls"] = str(int(sample.label)).encode("ascii")
    elif schema.attributes is not None:
        group["attr.npy"] = _npy(np.ascontiguousarray(sample.label, dtype=np.uint8))
    if schema.mask_classes is not None:
        _check_mask(sample.mask, schema, f"sample {key}")
        group["seg.png"] = _png(sample.mask)
    elif sample.mask is not None:
        raise InputError(f"sample {key} has a mask but the schema has no mask_classes")
    if sample.meta:
        group["json"] = json.dumps(sample.meta, sort_keys=True).encode("utf-8")
    return group


def _encode_image(image: np.ndarray, schema: Schema) -> bytes:
    array = image[0] if image.shape[0] == 1 else np.ascontiguousarray(image.transpose(1, 2, 0))
    if schema.image_format == "png":
        return _png(array)
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", quality=schema.jpeg_quality, subsampling=0 if
                                schema.jpeg_quality >= 90 else 2, optimize=False)
    return out.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(out, format="PNG")
    return out.getvalue()


# ---------------------------------------------------------------- decoding (stream, verify)

def decode(members: dict[str, bytes], schema: Schema, where: str) -> dict[str, Any]:
    """Tar members of one sample -> {"image": uint8 (C, H, W), "label": int | uint8 (A,), "mask": uint8 (H, W),
    "code": float32 code_shape}.

    Only the fields the schema has are returned. Raises `BadSample` (naming `where`) for a missing
    member, an undecodable image, a wrong shape, or a label / mask value outside the schema.
    """
    out: dict[str, Any] = {}
    if schema.image_shape is not None:
        image_member = schema.image_format
        if image_member not in members:
            raise BadSample(where, f"missing member .{image_member} (it has {sorted(members)})")
        out["image"] = _decode_image(members[image_member], schema, where)
    if schema.code_shape is not None:
        raw = members.get("code.npy")
        if raw is None:
            raise BadSample(where, f"missing member .code.npy (it has {sorted(members)})")
        try:
            out["code"] = np.load(io.BytesIO(raw), allow_pickle=False)
            _check_code(out["code"], schema, "code.npy")
        except ValueError as err:  # InputError is a ValueError too
            raise BadSample(where, str(err)) from None
    if schema.num_classes is not None:
        raw = members.get("cls")
        if raw is None:
            raise BadSample(where, "missing member .cls (class label)")
        try:
            out["label"] = int(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise BadSample(where, f"class label {raw[:20]!r} is not an integer") from None
    elif schema.attributes is not None:
        raw = members.get("attr.npy")
        if raw is None:
            raise BadSample(where, "missing member .attr.npy (attributes)")
        try:
            out["label"] = np.load(io.BytesIO(raw), allow_pickle=False)
        except ValueError as err:
            raise BadSample(where, f"attr.npy does not load ({err})") from None
    try:
        _check_label(out.get("label"), schema, "label")
    except ValueError as err:
        raise BadSample(where, str(err)) from None
    if schema.mask_classes is not None:
        raw = members.get("seg.png")
        if raw is None:
            raise BadSample(where, "missing member .seg.png (label map)")
        mask = _open_image(raw, where, "seg.png")
        if mask.mode not in ("L", "P"):
            raise BadSample(where, f"seg.png has mode {mask.mode}; a label map is mode L (uint8 ids)")
        try:
            _check_mask(np.asarray(mask), schema, "seg.png")
        except ValueError as err:
            raise BadSample(where, str(err)) from None
        out["mask"] = np.asarray(mask)
    return out


def _open_image(raw: bytes, where: str, member: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise BadSample(where, f"{member} does not decode ({type(err).__name__}: {err})") from None
    return image


def _decode_image(raw: bytes, schema: Schema, where: str) -> np.ndarray:
    image = _open_image(raw, where, schema.image_format)
    mode = "L" if schema.image_shape[0] == 1 else "RGB"
    array = np.asarray(image if image.mode == mode else image.convert(mode))
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    if array.shape != tuple(schema.image_shape):
        raise BadSample(where, f"image has shape {array.shape}, the manifest says {tuple(schema.image_shape)}")
    return array


def _check_label(label: Any, schema: Schema, where: str) -> None:
    if schema.num_classes is not None:
        if label is None or not 0 <= int(label) < schema.num_classes:
            raise InputError(f"{where}: class {label} outside 0..{schema.num_classes - 1}")
    elif schema.attributes is not None:
        array = np.asarray(label)
        if (label is None or array.dtype != np.uint8 or array.shape != (len(schema.attributes),)
                or not np.isin(array, (0, 1)).all()):
            raise InputError(f"{where}: attributes must be {len(schema.attributes)} values in {{0, 1}}, "
                             f"got {array.dtype} {array.shape}")
    elif label is not None:
        raise InputError(f"{where}: has a label but the schema has neither num_classes nor attributes")


def _check_code(code: np.ndarray | None, schema: Schema, where: str) -> None:
    shape = tuple(schema.code_shape)
    if code is None or np.asarray(code).shape != shape or not np.issubdtype(np.asarray(code).dtype, np.floating):
        got = "none" if code is None else f"{np.asarray(code).dtype} {np.asarray(code).shape}"
        raise InputError(f"{where}: code must be float32 {shape}, got {got}")
    if not np.isfinite(code).all():
        raise InputError(f"{where}: code holds non-finite values")
    if schema.code_family == "bernoulli" and not np.isin(code, (0.0, 1.0)).all():
        raise InputError(f"{where}: a bernoulli code holds values other than 0 and 1")


def _check_mask(mask: np.ndarray | None, schema: Schema, where: str) -> None:
    shape = tuple(schema.image_shape[1:])
    if mask is None or mask.dtype != np.uint8 or mask.shape != shape:
        got = "none" if mask is None else f"{mask.dtype} {mask.shape}"
        raise InputError(f"{where}: label map must be uint8 {shape}, got {got}")
    if mask.size and int(mask.max()) >= len(schema.mask_classes):
        raise InputError(f"{where}: label map value {int(mask.max())} outside 0..{len(schema.mask_classes) - 1}")


def known_member(name: str) -> bool:
    """Whether a member suffix belongs to the per-sample format."""
    return name in _MEMBERS
