"""Bad data: a truncated tar, a corrupt image, a missing mask, a label outside the schema, odd or crafted tar headers.

Each is injected into real per-sample shards (image + class + label map) written by `convert`, then read by
the train stream under both policies, by the eval iterator, and by `symeq shards verify`. The tar headers
(a name that is not UTF-8, a base-256 or negative size, sparse members, pax tricks) are ones that `tarfile`
accepts or chokes on while indexing; none may crash a reader.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from symeq_dist.cli import main
from symeq_dist.config import DataConfig
from symeq_dist.data import DataError, Sample, Schema, build_eval_batches, build_train_stream, verify_shards
from symeq_dist.data.tario import index_shard
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


# ---------------------------------------------------------------- tar headers that tarfile accepts or chokes on

def edit_header(shard: Path, member: str, edit: Callable[[bytearray], None]) -> None:
    """Edit one member's 512-byte ustar header in place and rewrite its checksum, so that tarfile accepts it."""
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        offset = tar.getmember(member).offset
    header = data[offset:offset + tarfile.BLOCKSIZE]
    edit(header)
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\0" % sum(header)
    data[offset:offset + tarfile.BLOCKSIZE] = header
    shard.write_bytes(bytes(data))


def set_size(size: int) -> Callable[[bytearray], None]:
    """A header edit: the size field in GNU base-256 (0x80 = positive, 0xff = negative two's complement)."""
    def edit(header: bytearray) -> None:
        header[124:136] = (b"\x80" if size >= 0 else b"") + size.to_bytes(12 if size < 0 else 11, "big", signed=True)
    return edit


def add_pax(records: dict[str, str]) -> Callable[[Path], None]:
    """A shard damage: pax records in front of member 000043.png (the rest rewritten by tarfile, byte for byte)."""
    def damage(shard: Path) -> None:
        out = io.BytesIO()
        with tarfile.open(shard) as src, tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as dst:
            for info in src.getmembers():
                if info.name == "000043.png":
                    info.pax_headers = records
                dst.addfile(info, src.extractfile(info))
        shard.write_bytes(out.getvalue())
    return damage


def pax_chain(shard: Path) -> None:
    """A shard damage: 1000 empty pax headers in front of member 000043.png (tarfile recurses once per header)."""
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        offset = tar.getmember("000043.png").offset
    pax = tarfile.TarInfo("pax")
    pax.type = tarfile.XHDTYPE
    shard.write_bytes(data[:offset] + pax.tobuf(tarfile.USTAR_FORMAT) * 1000 + data[offset:])


def not_utf8(header: bytearray) -> None:
    header[8] = 0xFF  # "000043.png" -> b"000043.p\xffg": no .png member any more; tarfile decodes it (surrogateescape)


def gnu_sparse(header: bytearray) -> None:
    header[156:157] = tarfile.GNUTYPE_SPARSE


HEADER_EDITS = {
    # name: (edit of 000043.png's header, text of the error)
    "name not UTF-8": (not_utf8, r"missing member \.png \(it has \['cls', 'p\\\\xffg', 'seg\.png'\]\)"),
    "GNU sparse member": (gnu_sparse, r"member 000043\.png is a sparse file"),
}


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("policy", ["fail", "skip"])
@pytest.mark.parametrize("name", sorted(HEADER_EDITS))
def test_member_header_tarfile_accepts_is_a_named_bad_sample(toy: Path, name: str, policy: str,
                                                             num_workers: int) -> None:
    edit, text = HEADER_EDITS[name]
    edit_header(toy / "toy-train-000004.tar", "000043.png", edit)
    where = r"toy-train-000004\.tar, key 000043: "
    cfg = DataConfig(shards=str(toy), binarize_threshold=None, noise="none", bad_samples=policy)
    if policy == "fail":
        with pytest.raises(DataError, match=where + text):
            all_batches(cfg, 6, num_workers)
    else:
        batches, skipped = all_batches(cfg, 6, num_workers)
        keys = [k for b in batches for k in b["key"]]
        assert skipped == 1 and sorted(keys) == [f"{i:06d}" for i in range(60) if i != 43]
    assert any(re.search(where + text, line) for line in verify_shards(toy).problems)


def test_base256_member_size_reads_as_tarfile_reads_it(toy: Path) -> None:
    shard = toy / "toy-train-000004.tar"
    with tarfile.open(shard) as tar:
        size = tar.getmember("000043.png").size
    edit_header(shard, "000043.png", set_size(size))  # GNU tar's encoding of sizes >= 8 GiB; valid at any size
    with tarfile.open(shard) as tar:
        assert tar.getmember("000043.png").size == size
    cfg = DataConfig(shards=str(toy), binarize_threshold=None, noise="none", bad_samples="fail")
    batches, skipped = all_batches(cfg, 6)
    images = {k: image for b in batches for k, image in zip(b["key"], b["image"], strict=True)}
    assert skipped == 0 and len(images) == 60
    assert np.array_equal(images["000043"].numpy(), make_toy(43).image)


DAMAGES = {
    # name: (how to break toy-train-000004.tar at member 000043.png, text of its index damage)
    # -1536 points tarfile back at 000043.cls's header: tarfile 3.11 then loops forever over the two members
    "negative size": (lambda p: edit_header(p, "000043.png", set_size(-1536)), "negative size -1536"),
    "GNU sparse 1.0 map": (add_pax({"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}), "ValueError"),
    "1000 pax headers": (pax_chain, "RecursionError"),
    # 000043.png's data starts at byte 10752: cut inside it, the group is incomplete and must not be indexed
    "cut inside a group": (lambda p: p.write_bytes(p.read_bytes()[:10800]), "cut off at byte 10800"),
}


@pytest.mark.parametrize("name", sorted(DAMAGES))
def test_index_never_raises_for_a_damaged_tar(toy: Path, name: str) -> None:
    damage, text = DAMAGES[name]
    shard = toy / "toy-train-000004.tar"
    damage(shard)
    index = index_shard(shard)
    assert index.keys == ("000040", "000041", "000042") and text in index.damage  # 000043 may be incomplete
    cfg = DataConfig(shards=str(toy), binarize_threshold=None, noise="none", bad_samples="fail")
    with pytest.raises(DataError, match=rf"toy-train-000004\.tar, sample #\d: not in the tar: .*{text}"):
        all_batches(cfg, 6)
    batches, skipped = all_batches(DataConfig(**{**cfg.__dict__, "bad_samples": "skip"}), 6)
    assert skipped == 7 and "000043" not in {k for b in batches for k in b["key"]}
