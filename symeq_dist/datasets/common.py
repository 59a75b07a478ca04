"""What every shard writer shares: the manifest's provenance fields, file hashing, names, atomic manifest writes.

Offline code: never imported by a training process.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import os
import re
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from symeq_dist.data.manifest import MANIFEST_NAME

NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")  # dataset and split names: they become file names


def provenance() -> dict[str, Any]:
    """Command line and library versions (PNG bytes depend on the zlib behind Pillow)."""
    versions = {name: importlib.metadata.version(name) for name in ("numpy", "pillow", "webdataset")}
    return {"command": shlex.join(sys.argv), "writer": {"module": __name__, "versions": versions}}


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """`<out_dir>/manifest.json` by atomic rename: a reader sees the old file, the new one, or none."""
    path = Path(out_dir) / MANIFEST_NAME
    tmp = path.with_name(MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)


def write_tar(path: Path, groups: Iterable[dict[str, Any]]) -> str:
    """Write webdataset sample groups ({"__key__": key, suffix: bytes, ...}) as one tar, deterministically
    (fixed mtime, owner and mode; members in sorted name order), via a temporary file; returns its sha256.

    Exceptions raised while `groups` is consumed propagate; nothing is left at `path` then.
    """
    from webdataset import TarWriter  # imported here: the converters' command lines load without it (1.3 s)

    buffer = io.BytesIO()
    with TarWriter(buffer, encoder=False, mtime=0, user="", group="", mode=0o444) as writer:
        for group in groups:
            writer.write(group)
    data = buffer.getvalue()
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()
