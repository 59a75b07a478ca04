"""The data layer of training and evaluation: manifests, the train and eval streams, uint8 -> float.

`manifest.py` (format, checked reading), `schema.py` (what a sample holds, decoding), `tario.py` (tar index
and seeks), `stream.py` (epoch order, per-rank batches, resume, bad data), `verify.py`, `transforms.py`.
Writing shards is offline work (`symeq_dist.datasets`), never imported from here. The names that need
torch (the streams, the transforms) load on first use, so `symeq shards` and `verify` start without torch.
Must not import models, engines or datasets.
"""

from __future__ import annotations

import importlib
from typing import Any

from symeq_dist.data.manifest import MANIFEST_NAME, load_manifest
from symeq_dist.data.schema import BadSample, Sample, Schema
from symeq_dist.data.verify import VerifyReport, verify_shards

_LAZY = {"Batch": "stream", "DataError": "stream", "TrainStream": "stream", "build_eval_batches": "stream",
         "build_train_stream": "stream", "pixel_marginal": "stream", "add_noise": "transforms",
         "to_float": "transforms"}

__all__ = [
    "MANIFEST_NAME", "BadSample", "Batch", "DataError", "Sample", "Schema", "TrainStream", "VerifyReport",
    "add_noise", "build_eval_batches", "build_train_stream", "load_manifest", "pixel_marginal", "to_float",
    "verify_shards",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"symeq_dist.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'symeq_dist.data' has no attribute {name!r}")
