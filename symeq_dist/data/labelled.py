"""The labelled stream of the semi-supervised game (METHOD §7.4): rows whose class is observed.

A pool of `data.labels_per_class` samples of every class of the training split (-1: every sample) is chosen
once, identically on every rank: each sample gets a priority from a permutation seeded by the run's seed, and
each class keeps its lowest-priority samples (one pass over the split, memory for the pool only). Every round,
every rank draws the same number of rows from the pool with replacement, from a generator of its own seeded by
(seed, rank): batches are equal per rank whatever the pool size, and the generator's state in the rank's
checkpoint makes a resume draw the same rows. Rows are uint8 images and one-hot float labels with a mask of
ones (a mask entry 0 would make its row an unlabelled one). Must not import models or engines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from symeq_dist.data.manifest import load_manifest
from symeq_dist.data.stream import iter_eval_batches
from symeq_dist.errors import InputError

_POOL_PURPOSE = 0x1AB3  # first SeedSequence word of the pool's priorities and of the ranks' draws


class LabelledPool:
    """The labelled rows of a split: chosen once, drawn with replacement per rank (see the module docstring)."""

    def __init__(self, shards: str | Path, split: str, *, per_class: int, seed: int, rank: int) -> None:
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
        self._seed, self._rank = seed, rank
        self._gen = torch.Generator()
        self._gen.manual_seed(int(np.random.SeedSequence([_POOL_PURPOSE, seed, rank]).generate_state(1)[0]))

    def __len__(self) -> int:
        return len(self.labels)

    def draw(self, num: int) -> dict[str, torch.Tensor]:
        """`num` rows with replacement: image uint8 (num, C, H, W), c one-hot float (num, K), c_mask ones (num,)."""
        rows = torch.randint(len(self.labels), (num,), generator=self._gen)
        labels = self.labels[rows]
        return {"image": self.images[rows], "label": labels,
                "c": torch.nn.functional.one_hot(labels, self.num_classes).float(), "c_mask": torch.ones(num)}

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
                             "the data or data.labels_per_class changed; start a new run")
        self._gen.set_state(state["gen"])
