"""`symeq shards verify DIR`: read every byte of every shard and check it against the manifest.

Checks per shard: the file exists, its size (when recorded) and sha256, that the tar is whole, its number
of samples, and that every sample decodes and fits the schema (image shape, labels, masks). Problems are
collected, not raised one at a time, so one run lists everything that is wrong, each with the shard and key.
Must not import models or engines.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from symeq_dist.data.manifest import MANIFEST_NAME, samples_per_member
from symeq_dist.data.schema import BadSample, Schema
from symeq_dist.data.tario import ShardReader

MAX_LISTED = 5  # bad samples listed per shard; the rest are counted


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = (f"{self.shards} shards, {self.samples} samples checked: "
                f"{'all match the manifest' if self.ok else f'{len(self.problems)} problems'}")
        return "\n".join([head, *(f"  {p}" for p in self.problems)])


def verify_shards(shards_dir: str | Path, manifest: dict | None = None) -> VerifyReport:
    """Check every shard of `manifest` (default: `shards_dir`'s); see the module docstring."""
    from symeq_dist.data import load_manifest  # the package imports this module

    shards_dir = Path(shards_dir)
    manifest = load_manifest(shards_dir) if manifest is None else manifest
    schema, per_member = Schema.from_manifest(manifest), samples_per_member(manifest)
    report = VerifyReport()
    entries = [entry for split in manifest["splits"].values() for entry in split["shards"]]
    total = sum(int(e["num_samples"]) for e in entries)
    with tqdm(total=total, desc="verify", unit="img", disable=not sys.stderr.isatty()) as bar:
        for entry in entries:
            name, count = entry["name"], int(entry["num_samples"])
            path = shards_dir / name
            report.shards += 1
            if not path.is_file():
                report.problems.append(f"{name}: missing (listed in {MANIFEST_NAME})")
                bar.update(count)
                continue
            size = path.stat().st_size
            if entry.get("size", size) != size:  # manifests of the per-sample converters record sizes
                report.problems.append(f"{name}: {size} bytes, the manifest says {entry['size']} (the file changed)")
            elif hashlib.sha256(path.read_bytes()).hexdigest() != entry.get("sha256"):
                report.problems.append(f"{name}: sha256 differs from the manifest (the file changed)")
            reader = ShardReader([str(path)], [count], schema, per_member)
            index = reader.index(0)
            if index.damage:
                report.problems.append(f"{name}: {index.damage}")
            groups = -(-count // per_member)
            if len(index.keys) > groups:
                report.problems.append(f"{name}: {len(index.keys)} sample groups, the manifest says {groups}")
            bad = 0
            for sample in reader.samples(0):
                report.samples += 1
                if isinstance(sample, BadSample):
                    bad += 1
                    if bad <= MAX_LISTED:
                        report.problems.append(str(sample))
                bar.update(1)
            if bad > MAX_LISTED:
                report.problems.append(f"{name}: {bad - MAX_LISTED} more bad samples")
            reader.close()
    return report
