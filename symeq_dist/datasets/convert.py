"""The conversion engine behind every per-sample converter: parallel, deterministic, resumable.

A converter lists its source records per split (JSON values, e.g. a file name and its attributes) and
gives a top-level `make_sample(record) -> Sample`. `convert` cuts each split into shards of
`samples_per_shard` records, writes the shards in worker processes (each tar depends only on its records,
so the bytes do not depend on the number of workers), and records every finished shard in a journal
(`<out>/.convert-journal/`). Rerunning the same command after an interruption or a crash keeps every
journalled shard whose bytes still match and writes the rest; different records or options start over.
`manifest.json` is written last, atomically, with the plan's hash and every shard's size and sha256, and
the journal is then removed. Rerunning a finished conversion reads the manifest and stats each shard: it
writes nothing when all sizes match, rewrites only missing or resized shards, and rewrites the shards
whose bytes changed with `verify=True` (`--verify`). Must not import torch, models or engines.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from symeq_dist.data.manifest import MANIFEST_NAME, PER_SAMPLE
from symeq_dist.data.schema import Sample, Schema, encode
from symeq_dist.datasets.common import NAME_RE, provenance, write_manifest, write_tar
from symeq_dist.errors import InputError

log = logging.getLogger(__name__)

JOURNAL = ".convert-journal"
MakeSample = Callable[[Any], Sample]


class ConversionError(InputError):
    """A source record could not be converted; the message names the record and the shard."""


@dataclass(frozen=True)
class _Job:
    name: str
    split: str
    first: int  # index of the first record within the split (keys are zero-padded split indices)
    width: int  # key width
    records: tuple[Any, ...]


def convert(out_dir: Path, *, dataset: str, splits: dict[str, Sequence[Any]], make_sample: MakeSample,
            schema: Schema, samples_per_shard: int, workers: int, meta: dict[str, Any],
            verify: bool = False) -> dict[str, Any]:
    """Write `{dataset}-{split}-%06d.tar` shards of per-sample groups plus `manifest.json`.

    Args:
        out_dir: created if missing; may hold an interrupted conversion's shards and journal, or a finished
            one (same plan: nothing is written when every shard has its recorded size, missing or resized
            shards are rewritten; another plan: converted again).
        splits: split name -> records (JSON-serialisable); an empty split is written with no shards.
        make_sample: top-level function (it is pickled to the workers) mapping a record to a `Sample`;
            raises ValueError naming the source file when the record is bad.
        schema: what every sample holds (checked per sample).
        samples_per_shard: records per tar; the last shard of a split may hold fewer.
        workers: processes (1 = in this process).
        meta: manifest fields of the converter (source checksums, crop, size, ...); the command line and
            library versions are added.
        verify: with a finished conversion of the same plan, also re-hash every shard and rewrite those whose
            bytes differ from the manifest (without it, a shard of the recorded size is kept unread).

    Returns:
        The manifest that was written, or the finished conversion's when there was nothing to do.

    Raises:
        ConversionError: a record failed; shards finished so far stay journalled, so rerunning the same
            command after fixing the input resumes.
    """
    out_dir = Path(out_dir)
    _check_arguments(dataset, splits, schema=schema, samples_per_shard=samples_per_shard, workers=workers, meta=meta)
    jobs = _plan(dataset, splits, samples_per_shard)
    plan_hash = _hash({"version": schema.format_version, "dataset": dataset, "schema": schema.to_manifest(),
                       "samples_per_shard": samples_per_shard, "meta": meta,
                       "make_sample": _describe(make_sample),
                       "splits": {split: list(records) for split, records in splits.items()}})
    previous, kept = _finished(out_dir, plan_hash, jobs, verify=verify)
    if previous is not None:
        missing = [job.name for job in jobs if job.name not in kept]
        if not missing:
            log.info("nothing to do: %s already holds this conversion (%d shards, %d samples); `symeq shards "
                     "verify %s` re-hashes every shard", out_dir, len(jobs), sum(len(j.records) for j in jobs), out_dir)
            return previous
        log.warning("%s: %d of %d shards are missing or changed since the manifest was written (%s); rewriting "
                    "them, keeping the others", out_dir, len(missing), len(jobs), ", ".join(missing[:5]))
    journal, done = _start(out_dir, plan_hash, jobs, kept)
    todo = [job for job in jobs if job.name not in done]
    total = sum(len(job.records) for job in todo)
    with tqdm(total=total, desc=f"{dataset} shards", unit="img", disable=not sys.stderr.isatty()) as bar:
        for job, entry in _run(todo, make_sample, schema, out_dir, workers):
            (journal / f"{job.name}.json").write_text(json.dumps(entry))
            done[job.name] = entry
            bar.update(len(job.records))
    manifest = _manifest(dataset, splits, jobs, done, schema, meta, plan_hash)
    write_manifest(out_dir, manifest)
    shutil.rmtree(journal)
    _warn_stale(out_dir, dataset, {job.name for job in jobs})
    log.info("wrote %s: %s", out_dir / MANIFEST_NAME,
             ", ".join(f"{s} {e['num_samples']} samples in {len(e['shards'])} shards"
                       for s, e in manifest["splits"].items()))
    return manifest


def _check_arguments(dataset: str, splits: dict[str, Sequence[Any]], *, schema: Schema, samples_per_shard: int,
                     workers: int, meta: dict[str, Any]) -> None:
    if not NAME_RE.match(dataset) or not all(NAME_RE.match(s) for s in splits):
        raise InputError(f"dataset {dataset!r} and split names {list(splits)} may use only letters, digits, "
                         "'_' and '-' (they become file names)")
    if samples_per_shard < 1 or workers < 1:
        raise InputError(f"samples_per_shard and workers must be >= 1, got {samples_per_shard} and {workers}")
    clash = sorted(set(meta) & {"format_version", "format", "samples_per_member", "dataset", "splits", "plan_sha256",
                                *schema.to_manifest(), *provenance()})
    if clash:
        raise ValueError(f"converter meta keys {clash} are written by convert itself; rename them")


def _start(out_dir: Path, plan_hash: str, jobs: list[_Job],
           kept: dict[str, dict[str, Any]]) -> tuple[Path, dict[str, dict[str, Any]]]:
    """Remove the manifest, open the journal and seed it with `kept` (shards of a finished conversion of this
    plan that are still there); returns the journal and the entries of every shard that needs no writing."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)  # never a manifest next to half-written shards
    journal = _open_journal(out_dir / JOURNAL, plan_hash)
    for name, entry in kept.items():  # an interruption from here on keeps them too
        (journal / f"{name}.json").write_text(json.dumps(entry))
    done = {job.name: entry for job in jobs
            if (entry := kept.get(job.name) or _journalled(out_dir, journal, job)) is not None}
    if len(done) > len(kept):
        log.info("resuming %s: %d of %d shards already written", out_dir, len(done), len(jobs))
    return journal, done


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    """`<out_dir>/manifest.json` if `convert` wrote it (it has a plan hash and shard sizes), else None."""
    path = out_dir / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
        entries = [entry for split in manifest["splits"].values() for entry in split["shards"]]
        if isinstance(manifest.get("plan_sha256"), str) and all(
                isinstance(entry["name"], str) and isinstance(entry["size"], int) for entry in entries):
            return manifest
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # no manifest, or not convert's
        pass
    return None


def _finished(out_dir: Path, plan_hash: str, jobs: list[_Job], *,
              verify: bool) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """The manifest of a finished conversion of this plan (else None) and its entries of the shards that are
    present with the recorded size (one stat per shard) and, with `verify`, the recorded sha256."""
    manifest = _read_manifest(out_dir)
    if manifest is None or manifest["plan_sha256"] != plan_hash:
        return None, {}
    entries = [entry for split in manifest["splits"].values() for entry in split["shards"]]
    if [entry["name"] for entry in entries] != [job.name for job in jobs]:
        return None, {}
    kept = {entry["name"]: entry for entry in entries if _size(out_dir / entry["name"]) == entry["size"]}
    if verify:
        for name in [n for n, e in kept.items() if _sha256_file(out_dir / n) != e["sha256"]]:
            log.warning("%s: its bytes differ from the manifest's sha256; rewriting it", out_dir / name)
            del kept[name]
    return manifest, kept


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:  # missing, or a path that cannot be a file
        return None


def _describe(fn: Any) -> str:
    """A stable description of `make_sample` for the plan hash: function names, partial arguments, or the
    repr of a callable object (dataclasses print their options). Never a memory address."""
    if isinstance(fn, functools.partial):
        return f"{_describe(fn.func)}(*{fn.args!r}, **{sorted(fn.keywords.items())!r})"
    if isinstance(fn, type) or (callable(fn) and hasattr(fn, "__qualname__")):
        return f"{fn.__module__}.{fn.__qualname__}"
    return f"{type(fn).__module__}.{fn!r}"


def _plan(dataset: str, splits: dict[str, Sequence[Any]], per_shard: int) -> list[_Job]:
    jobs = []
    for split, records in splits.items():
        width = max(6, len(str(max(len(records) - 1, 0))))
        for index, start in enumerate(range(0, len(records), per_shard)):
            jobs.append(_Job(f"{dataset}-{split}-{index:06d}.tar", split, start, width,
                             tuple(records[start:start + per_shard])))
    return jobs


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _open_journal(journal: Path, plan_hash: str) -> Path:
    """The journal dir for `plan_hash`; one for another plan (other inputs or options) is discarded."""
    plan_file = journal / "plan.json"
    if journal.is_dir():
        old = json.loads(plan_file.read_text()).get("plan") if plan_file.is_file() else None
        if old != plan_hash:
            log.warning("%s belongs to a conversion with other inputs or options; starting over", journal)
            shutil.rmtree(journal)
    journal.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(json.dumps({"plan": plan_hash}))
    return journal


def _journalled(out_dir: Path, journal: Path, job: _Job) -> dict[str, Any] | None:
    """The journal entry of a finished shard whose file still has the recorded sha256, else None."""
    record, path = journal / f"{job.name}.json", out_dir / job.name
    if not (record.is_file() and path.is_file()):
        return None
    entry = json.loads(record.read_text())
    if hashlib.sha256(path.read_bytes()).hexdigest() != entry.get("sha256"):
        log.warning("%s changed since it was written; rewriting it", path)
        return None
    return entry


def _run(jobs: list[_Job], make_sample: MakeSample, schema: Schema, out_dir: Path, workers: int):
    """Yield (job, manifest entry) per written shard, in the order they finish."""
    args = [(job, make_sample, schema, str(out_dir)) for job in jobs]
    if workers == 1 or len(jobs) <= 1:
        for arg in args:
            yield arg[0], _write_job(arg)
        return
    by_name = {job.name: job for job in jobs}
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        for entry in pool.imap_unordered(_write_job, args):  # journal each shard as soon as it is written
            yield by_name[entry["name"]], entry


def _write_job(arg: tuple[_Job, MakeSample, Schema, str]) -> dict[str, Any]:
    """Write one shard atomically (temporary file, then rename); return its manifest entry."""
    job, make_sample, schema, out_dir = arg

    def groups() -> Iterator[dict[str, Any]]:
        for offset, record in enumerate(job.records):
            key = f"{job.first + offset:0{job.width}d}"
            try:
                yield encode(make_sample(record), schema, key)
            except Exception as err:  # any failure of a record (PIL raises many kinds) names the shard and key
                raise ConversionError(
                    f"{job.name}, key {key}: {err}. Shards finished so far are kept: fix or remove the input "
                    "and rerun the same command to resume") from None

    path = Path(out_dir) / job.name
    digest = write_tar(path, groups())
    return {"name": job.name, "num_samples": len(job.records), "sha256": digest, "size": path.stat().st_size}


def _manifest(dataset: str, splits: dict[str, Sequence[Any]], jobs: list[_Job], done: dict[str, dict],
              schema: Schema, meta: dict[str, Any], plan_hash: str) -> dict[str, Any]:
    entries = {split: {"num_samples": len(records), "shards": []} for split, records in splits.items()}
    for job in jobs:
        entries[job.split]["shards"].append(done[job.name])
    return {"format_version": schema.format_version, "format": PER_SAMPLE, "samples_per_member": 1, "dataset": dataset,
            **schema.to_manifest(), "splits": entries, **meta, "plan_sha256": plan_hash, **provenance()}


def _warn_stale(out_dir: Path, dataset: str, names: set[str]) -> None:
    stale = sorted(p.name for p in out_dir.glob(f"{dataset}-*.tar") if p.name not in names)
    if stale:
        log.warning("%s holds %d shards not in the new manifest (ignored; delete them): %s", out_dir, len(stale),
                    ", ".join(stale[:5]))
