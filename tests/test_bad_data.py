"""Bad data: a truncated tar, a corrupt image, a missing mask, a label outside the schema.

Each is injected into real per-sample shards (image + class + label map) written by `convert`, then read by
the train stream under both policies, by the eval iterator, and by `symeq shards verify`.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from symeq_dist.cli import main
from symeq_dist.config import DataConfig
from symeq_dist.data import DataError, Sample, Schema, build_eval_batches, build_train_stream, verify_shards
from symeq_dist.datasets.convert import convert

SCHEMA = Schema((3, 8, 8), "png", num_classes=3, mask_classes=("background", "a", "b"))


def make_toy(index: int) -> Sample:
    rng = np.random.default_rng(index)
    return Sample(rng.integers(0, 256, (3, 8, 8), dtype=np.uint8), label=index % 3,
                  mask=rng.integers(0, 3, (8, 8), dtype=np.uint8))


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    """60 train samples in 6 shards of 10 (keys 000000..000059), 10 valid."""
    convert(tmp_path, dataset="toy", splits={"train": list(range(60)), "valid": list(range(60, 70))},
            make_sample=make_toy, schema=SCHEMA, samples_per_shard=10, workers=1, meta={})
    return tmp_path


def rewrite_member(shard: Path, member: str, data: bytes | None) -> None:
    """Replace (or, with None, drop) one member of a tar, keeping every other byte as written."""
    out = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for info in src.getmembers():
            payload = src.extractfile(info).read()
            if info.name == member:
                if data is None:
                    continue
                payload, info.size = data, len(data)
            dst.addfile(info, io.BytesIO(payload))
    shard.write_bytes(out.getvalue())


def all_batches(cfg: DataConfig, steps: int, num_workers: int = 0) -> tuple[list[dict], int]:
    cfg = DataConfig(**{**cfg.__dict__, "num_workers": num_workers})
    with build_train_stream(cfg, seed=0, rank=0, world_size=1, batch_size=10) as stream:
        batches = [next(stream) for _ in range(steps)]
        return batches, stream.skipped


INJECTIONS = {
    # name: (shard, how to break it, the key named in the error, text of the error)
    "corrupt image": ("toy-train-000001.tar", lambda p: rewrite_member(p, "000013.png", b"\x89PNG not really"),
                      "key 000013", "png does not decode"),
    "missing mask": ("toy-train-000002.tar", lambda p: rewrite_member(p, "000025.seg.png", None),
                     "key 000025", "missing member .seg.png"),
    "label outside the schema": ("toy-train-000003.tar", lambda p: rewrite_member(p, "000031.cls", b"7"),
                                 "key 000031", "class 7 outside 0..2"),
    "truncated tar": ("toy-train-000005.tar", lambda p: p.write_bytes(p.read_bytes()[:3000]),
                      "toy-train-000005.tar", "truncated"),
}


@pytest.mark.parametrize("name", sorted(INJECTIONS))
@pytest.mark.parametrize("num_workers", [0, 2])
def test_fail_policy_names_shard_and_key(toy: Path, name: str, num_workers: int) -> None:
    shard, inject, key, text = INJECTIONS[name]
    inject(toy / shard)
    cfg = DataConfig(shards=str(toy), binarize_threshold=None, noise="none", bad_samples="fail")
    with pytest.raises(DataError, match=rf"{shard}.*{text}.*data\.bad_samples=skip") as err:
        all_batches(cfg, 6, num_workers)  # one epoch touches every sample
    assert key in str(err.value)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_policy_drops_counts_and_names(toy: Path, num_workers: int, caplog: pytest.LogCaptureFixture) -> None:
    for shard, inject, _, _ in INJECTIONS.values():
        inject(toy / shard)
    cfg = DataConfig(shards=str(toy), binarize_threshold=None, noise="none", bad_samples="skip")
    with caplog.at_level(logging.WARNING, logger="symeq_dist.data.stream"):
        batches, skipped = all_batches(cfg, 6, num_workers)
    keys = [k for b in batches for k in b["key"]]
    # 3000 bytes are less than the first sample's 3 members (3 x (header + data) = 3072 bytes): all 10 are lost
    assert skipped == 3 + 10 == sum(b["skipped"] for b in batches) == 60 - len(keys)
    assert not {"000013", "000025", "000031"} & set(keys) and len(set(keys)) == len(keys)
    assert all(len(b["key"]) == len(b["image"]) == len(b["label"]) == len(b["mask"]) for b in batches)
    for key in ("key 000013", "key 000025", "key 000031", "toy-train-000005.tar"):
        assert key in caplog.text


def test_verify_lists_every_injected_problem(toy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert verify_shards(toy).ok
    assert main(["shards", "verify", str(toy)]) == 0
    for shard, inject, _, _ in INJECTIONS.values():
        inject(toy / shard)
    (toy / "toy-valid-000000.tar").unlink()
    report = verify_shards(toy)
    text = report.summary()
    for shard, _, key, problem in INJECTIONS.values():
        assert any(shard in line and key in line and problem in line for line in text.splitlines()), (shard, text)
    assert "toy-valid-000000.tar: missing" in text
    assert "toy-train-000001.tar: sha256 differs" in text
    assert main(["shards", "verify", str(toy)]) == 1
    assert "problems" in capsys.readouterr().out


def test_eval_batches_follow_the_policy(toy: Path) -> None:
    rewrite_member(toy / "toy-valid-000000.tar", "000004.png", b"junk")  # keys count within the split
    with pytest.raises(DataError, match=r"toy-valid-000000\.tar, key 000004: png does not decode"):
        list(build_eval_batches(DataConfig(shards=str(toy)), split="valid", batch_size=4))
    batches = list(build_eval_batches(DataConfig(shards=str(toy), bad_samples="skip"), split="valid", batch_size=4))
    assert [k for b in batches for k in b["key"]] == [f"{i:06d}" for i in range(10) if i != 4]


def test_masks_and_labels_reach_the_batch(toy: Path) -> None:
    cfg = DataConfig(shards=str(toy), binarize_threshold=None, noise="none")
    batches, skipped = all_batches(cfg, 6)
    assert skipped == 0
    for batch in batches:
        for key, image, label, mask in zip(batch["key"], batch["image"], batch["label"], batch["mask"], strict=True):
            want = make_toy(int(key))
            assert np.array_equal(image.numpy(), want.image) and int(label) == want.label
            assert np.array_equal(mask.numpy(), want.mask)
    assert batches[0]["mask"].dtype == batches[0]["image"].dtype == torch.uint8
    assert batches[0]["mask"].shape == (10, 8, 8) and batches[0]["label"].dtype == torch.int64
    manifest = json.loads((toy / "manifest.json").read_text())
    assert manifest["mask"] == {"num_classes": 3, "names": ["background", "a", "b"]}
