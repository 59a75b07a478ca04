"""The labelled stream of the semi-supervised game (METHOD §7.4, §7.6): rows whose class, attribute vector or label
map is observed.

Classes: a pool of `data.labels_per_class` samples of every class of the training split (-1: every sample) is chosen
once, identically on every rank: each sample gets a priority from a permutation seeded by the run's seed, and
each class keeps its lowest-priority samples (one pass over the split, memory for the pool only). Every round,
every rank draws the same number of rows from the pool with replacement, from a generator of its own seeded by
(seed, rank): batches are equal per rank whatever the pool size, and the generator's state in the rank's
checkpoint makes a resume draw the same rows. Rows are uint8 images and one-hot float labels with a mask of
ones (a mask entry 0 would make its row an unlabelled one).

Label maps (and attribute vectors, `model.label: attributes`): the pool is the fraction `data.labelled_fraction` of
the training split with the lowest priorities in a fixed permutation of the split (seeded by a constant, not the
run's seed: every run of a data set shares its labelled images, and `prior.kind=masks` with the same fraction reads
exactly the pool's masks); rows carry the map one-hot (K, H, W) or the A attribute bits. Draws as for classes.
Must not import models or engines.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch

from symeq_dist.data.manifest import load_manifest
from symeq_dist.data.stream import iter_eval_batches
from symeq_dist.errors import InputError

_POOL_PURPOSE = 0x1AB3  # first SeedSequence word of the pool's priorities and of the ranks' draws
_MAP_PURPOSE = 0x5E6  # the label-map pool's priorities (no run seed: fixed per data set)


def label_map_pool(shards: str | Path, split: str, fraction: float,
                   observed: str = "maps") -> tuple[torch.Tensor, torch.Tensor, int]:
    """The labelled pool of `split` by fraction: the round(fraction * N) samples (at least one) with the lowest
    priorities in a fixed permutation of the split, in priority order (so it does not depend on the shard layout).

    The last pool read is kept (keyed by the manifest's path and modification time): a run's masks prior and its
    labelled pool ask for the same one at start-up, and the split is decoded once. Callers must not modify it.

    Returns:
        images uint8 (P, C, H, W); for observed="maps" the label maps int64 (P, H, W) and K (the manifest's mask
        classes), for observed="attributes" the 0/1 attribute vectors float (P, A) and A.

    Raises:
        InputError: the shard set has no label maps / attributes (names the fix).
    """
    shards = Path(shards).resolve()
    manifest_file = shards / "manifest.json"
    stamp = manifest_file.stat().st_mtime_ns if manifest_file.is_file() else None
    return _read_pool(shards, split, fraction, observed, stamp)


@functools.lru_cache(maxsize=1)
def _read_pool(shards: Path, split: str, fraction: float, observed: str,
               stamp: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    manifest = load_manifest(shards)
    maps = observed == "maps"
    if maps and not manifest.get("mask"):
        raise InputError(f"{shards} has no label maps (manifest.json has no `mask` entry); write a shard set with "
                         "masks (`symeq shards digits-seg`, `symeq shards celebamask-hq`) or set "
                         "data.labelled_fraction=0")
    if not maps and (manifest.get("label") or {}).get("kind") != "attributes":
        raise InputError(f"{shards} has no attributes (manifest.json `label` is not of kind attributes); write a shard "
                         "set with attributes (`symeq shards celeba`, `symeq shards celebamask-hq`) or set "
                         "data.labelled_fraction=0")
    total = manifest["splits"][split]["num_samples"]
    priority = np.random.default_rng([_MAP_PURPOSE]).permutation(total)
    size = max(1, round(fraction * total))
    keep = priority < size
    images, values, order = [], [], []
    index = 0
    for batch in iter_eval_batches(shards, manifest, split=split, batch_size=1000):
        chosen = np.flatnonzero(keep[index:index + len(batch["key"])])
        images.append(batch["image"][chosen])
        values.append(batch["mask" if maps else "label"][chosen])
        order.append(priority[index + chosen])
        index += len(batch["key"])
    rank = np.argsort(np.concatenate(order), kind="stable")
    if maps:
        return torch.cat(images)[rank], torch.cat(values)[rank].long(), int(manifest["mask"]["num_classes"])
    return torch.cat(images)[rank], torch.cat(values)[rank].float(), len(manifest["label"]["names"])


class LabelledPool:
    """The labelled rows of a split: chosen once, drawn with replacement per rank (see the module docstring)."""

    def __init__(self, shards: str | Path, split: str, *, per_class: int = 0, fraction: float = 0.0,
                 observed: str = "maps", seed: int, rank: int) -> None:
        self._seed, self._rank = seed, rank
        self._gen = torch.Generator()
        self._gen.manual_seed(int(np.random.SeedSequence([_POOL_PURPOSE, seed, rank]).generate_state(1)[0]))
        self.observed = "classes" if per_class else observed
        if fraction:
            self.images, self.labels, self.num_classes = label_map_pool(shards, split, fraction, observed)
            what = "label maps" if observed == "maps" else f"attribute vectors of {self.num_classes}"
            self.description = f"{len(self.labels)} {what} ({fraction:g} of split {split!r})"
            return
        shards = Path(shards)
        manifest = load_manifest(shards)
        label = manifest.get("label") or {}
        if label.get("kind") != "class" and not manifest.get("num_classes"):
            raise InputError(f"data.labels_per_class: {shards} has no class labels; write shards with classes "
                             "(e.g. `symeq shards mnist`) or set data.labels_per_class=0")
        self.num_classes = int(label.get("num_classes") or manifest["num_classes"])
        total = manifest["splits"][split]["num_samples"]
        priority = np.random.default_rng([_POOL_PURPOSE, seed]).permutation(total)
        keep: dict[int, list[tuple[int, np.ndarray]]] = {c: [] for c in range(self.num_classes)}
        index = 0
        for batch in iter_eval_batches(shards, manifest, split=split, batch_size=1000):
            for image, cls in zip(batch["image"].numpy(), batch["label"].tolist(), strict=True):
                keep[cls].append((int(priority[index]), image))
                if per_class >= 0 and len(keep[cls]) > 2 * per_class + 64:  # bound memory: drop the worst now
                    keep[cls] = sorted(keep[cls], key=lambda item: item[0])[:per_class]
                index += 1
        rows = [(p, image, cls) for cls, items in keep.items()
                for p, image in sorted(items, key=lambda item: item[0])[:per_class if per_class >= 0 else None]]
        if not rows:
            raise InputError(f"data.labels_per_class={per_class}: the pool of split {split!r} is empty")
        rows.sort(key=lambda row: row[0])  # pool order does not depend on the shard layout
        self.images = torch.from_numpy(np.stack([image for _, image, _ in rows]))
        self.labels = torch.tensor([cls for _, _, cls in rows], dtype=torch.int64)
        self.counts = torch.bincount(self.labels, minlength=self.num_classes).tolist()
        self.description = f"{len(self.labels)} rows ({'/'.join(map(str, self.counts))} per class)"

    def __len__(self) -> int:
        return len(self.labels)

    def draw(self, num: int) -> dict[str, torch.Tensor]:
        """`num` rows with replacement: image uint8 (num, C, H, W), label int64 (num,) or (num, H, W) or float (num, A),
        c one-hot float (num, K) or (num, K, H, W) or the attribute bits (num, A), c_mask ones (num,)."""
        rows = torch.randint(len(self.labels), (num,), generator=self._gen)
        labels = self.labels[rows]
        c = (labels if self.observed == "attributes"
             else torch.nn.functional.one_hot(labels, self.num_classes).movedim(-1, 1).float())
        return {"image": self.images[rows], "label": labels, "c": c, "c_mask": torch.ones(num)}

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self._gen.get_state(), "size": len(self.labels)}

    def load_state_dict(self, state: dict[str, Any] | None, step: int) -> None:
        """Continue the draws of `state`; None (a resume on another number of ranks): fresh draws for (seed, rank,
        step). A pool of another size (other data or labels_per_class) is refused."""
        if state is None:
            entropy = [_POOL_PURPOSE, self._seed, self._rank, step]
            self._gen.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
            return
        if state["size"] != len(self.labels):
            raise InputError(f"the checkpoint's labelled pool held {state['size']} rows, this one {len(self.labels)}: "
                             "the data, data.labels_per_class or data.labelled_fraction changed; start a new "
                             "run")
        self._gen.set_state(state["gen"])
