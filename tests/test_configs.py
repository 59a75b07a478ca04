"""Every run config shipped in configs/ starts: its engines build and it trains 2 steps at a tiny batch, on tiny
stand-in shards of the same image shape (the real data sets are not needed to catch a broken config). The prior
configs (configs/prior_*.yaml, `symeq prior train`) train 2 steps on stand-in latent codes of their family."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from symeq_dist.api import train as run_training
from symeq_dist.config import PriorRunConfig, load_config
from symeq_dist.data.schema import Sample, Schema
from symeq_dist.datasets.codes import write_code_set
from symeq_dist.datasets.convert import convert
from symeq_dist.datasets.packed import write_shards
from symeq_dist.runtime.ckpt_dirs import latest_dir
from tests.conftest import ROOT, subprocess_env

CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("prior_"))
PRIOR_CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("prior_*.yaml"))


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, ...], Path]:
    return {"root": tmp_path_factory.mktemp("stand_in")}  # type: ignore[dict-item]


def _labelled_sample(record: dict) -> Sample:
    """A random image of `record["shape"]` with a label map of 4 x 4 blocks of `record["masks"]` classes, or a
    vector of `record["attributes"]` random 0/1 attributes."""
    rng = np.random.default_rng(record["index"])
    shape = tuple(record["shape"])
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    if record["attributes"]:
        return Sample(image=image, label=rng.integers(0, 2, record["attributes"], dtype=np.uint8))
    blocks = rng.integers(0, record["masks"], (shape[1] // 4, shape[2] // 4), dtype=np.uint8)
    return Sample(image=image, mask=np.kron(blocks, np.ones((4, 4), np.uint8)))


def _stand_in(cache: dict, shape: tuple[int, ...], masks: int = 0, attributes: int = 0) -> Path:
    """Random uint8 images of `shape` with 10 classes (or label maps of `masks` classes, or `attributes` 0/1
    attributes, instead), train 64 / valid 32, written once per shape and labels."""
    key = (shape, masks, attributes)
    if (masks or attributes) and key not in cache:
        splits = {split: [{"index": offset + i, "shape": list(shape), "masks": masks, "attributes": attributes}
                          for i in range(n)] for split, n, offset in (("train", 64, 0), ("valid", 32, 64))}
        out = cache["root"] / ("x".join(map(str, shape)) + f"-masks{masks}-attributes{attributes}")
        masks_names, attribute_names = (tuple(str(k) for k in range(n)) if n else None for n in (masks, attributes))
        schema = Schema(image_shape=shape, mask_classes=masks_names, attributes=attribute_names)
        convert(out, dataset="standin", splits=splits, make_sample=_labelled_sample, schema=schema,
                samples_per_shard=32, workers=1, meta={})
        cache[key] = out
    if masks or attributes:
        return cache[key]
    if shape not in cache:
        rng = np.random.default_rng(0)
        splits = {split: (rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n))
                  for split, n in (("train", 64), ("valid", 32))}
        out = cache["root"] / "x".join(map(str, shape))
        write_shards(out, splits, dataset="standin", samples_per_shard=32, meta={})
        cache[shape] = out
    return cache[shape]


# celebamask128 (30 s) is the 64^2 config's family at twice the side: kept out of the default run (make test-slow)
SLOW_CONFIGS = {"celebamask128_symeq.yaml"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CONFIGS else n
                                  for n in CONFIGS])
def test_shipped_config_builds_and_trains_two_steps(name: str, tmp_path: Path, stand_ins: dict) -> None:
    shipped = load_config(ROOT / "configs" / name)
    seg = shipped.prior.kind == "masks"  # the image + segmentation model: stand-in label maps, pi(s) from them
    attributes = getattr(shipped.model, "label", None) == "attributes"
    shards = _stand_in(stand_ins, shipped.model.image_shape, shipped.model.num_classes if seg else 0,
                       shipped.model.num_classes if attributes else 0)
    masks = [f"prior.shards={shards}"] if seg else []
    masks += ["data.labelled_batch_size=4"] if seg or attributes else []
    cfg = load_config(ROOT / "configs" / name, [
        f"run_dir={tmp_path / 'run'}", f"data.shards={shards}", *masks, "data.num_workers=0", "train.steps=2",
        "train.batch_size=4", "checkpoint.every=2", "monitor.log_every=1", "monitor.image_every=2",
        "monitor.num_grid=4", "monitor.progress=false", "sampling.num_chains=2",
        f"engines.ds_config={ROOT / shipped.engines.ds_config}"])
    last = run_training(cfg)
    losses = [v for k, v in last.items() if k.endswith("/loss")]
    assert losses and all(np.isfinite(losses)), last
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()


@pytest.mark.parametrize("name", PRIOR_CONFIGS)
def test_shipped_prior_config_trains_two_steps(name: str, tmp_path: Path) -> None:
    shipped = load_config(ROOT / "configs" / name, cls=PriorRunConfig)
    family = "bernoulli" if shipped.model.kind == "made" else "gaussian"
    rng = np.random.default_rng(0)
    codes = {s: rng.normal(size=(n, 8)).astype(np.float32) for s, n in (("train", 64), ("valid", 16))}
    if family == "bernoulli":
        codes = {s: (c > 0).astype(np.float32) for s, c in codes.items()}
    write_code_set(tmp_path / "codes", dataset="codes", codes=codes, family=family, meta={})
    done = subprocess.run([sys.executable, "-m", "symeq_dist.cli", "prior", "train", str(ROOT / "configs" / name),
                           f"run_dir={tmp_path / 'run'}", f"data.shards={tmp_path / 'codes'}", "train.steps=2",
                           "train.batch_size=4", "monitor.progress=false", "monitor.eval_batches=1"],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train/loss" in done.stdout and latest_dir(tmp_path / "run").name == "step_00000002"
