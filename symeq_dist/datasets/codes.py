"""Latent shard sets: arrays of codes (a run's aggregate-posterior codes, a prior's samples) as shards.

`write_code_set` writes split -> float32 (n, *shape) arrays through the converters' engine (`convert.py`):
`<dataset>-<split>-%06d.tar` shards of `<key>.code.npy` members, a manifest whose `code` entry names the shape
and family, a journal that makes an interrupted write resumable, and a plan hash over the codes' bytes, so
the shards of other codes (another checkpoint, another seed) are never kept. The codes come from
`symeq prior codes` / `symeq prior sample` (`symeq_dist.api`); the sets feed `symeq prior train` and
`prior.kind=shards`. Must not import torch, models or engines.
"""

from __future__ import annotations

import functools
import hashlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from symeq_dist.data.schema import Sample, Schema
from symeq_dist.datasets.convert import convert


def write_code_set(out: Path, *, dataset: str, codes: dict[str, np.ndarray], family: str, meta: dict[str, Any],
                   samples_per_shard: int = 10000) -> dict[str, Any]:
    """Write `codes` (split -> float32 (n, *shape)) as a latent shard set in `out`; returns its manifest."""
    shapes = {tuple(array.shape[1:]) for array in codes.values()}
    if len(shapes) != 1:
        raise ValueError(f"every split needs codes of one shape, got {sorted(shapes)}")
    schema = Schema(image_shape=None, code_shape=shapes.pop(), code_family=family)
    out.mkdir(parents=True, exist_ok=True)
    digest = {split: hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()[:16]
              for split, a in codes.items()}
    with tempfile.TemporaryDirectory(dir=out, prefix=".codes-") as tmp:
        paths = {}
        for split, array in codes.items():
            paths[split] = str(Path(tmp) / f"{split}.npy")
            np.save(paths[split], np.ascontiguousarray(array, dtype=np.float32))
        records = {split: [[split, i] for i in range(len(array))] for split, array in codes.items()}
        maker = _CodeSample(paths, digest)
        return convert(out, dataset=dataset, splits=records, make_sample=maker, schema=schema,
                       samples_per_shard=samples_per_shard, workers=1, meta={**meta, "codes_sha256": digest})


class _CodeSample:
    """`make_sample` of a code set: record [split, index] -> that code. Its repr (part of the converter's plan
    hash) names the codes' digests, never the temporary files."""

    def __init__(self, paths: dict[str, str], digest: dict[str, str]) -> None:
        self.paths, self.digest = paths, digest

    @functools.cached_property
    def _arrays(self) -> dict[str, np.ndarray]:
        return {split: np.load(path, mmap_mode="r") for split, path in self.paths.items()}

    def __call__(self, record: list[Any]) -> Sample:
        split, index = record
        return Sample(image=None, code=np.array(self._arrays[split][int(index)], dtype=np.float32))

    def __repr__(self) -> str:
        return f"codes({sorted(self.digest.items())})"
