"""Feature networks: the FD-clf network on real MNIST digits (class labels), digits-seg canvases (classes present in
the mask), miniature CelebA (attributes) and label-less folders (rotation); the FID InceptionV3 (random init, real
file if any)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from face_trees import make_celeba_tree
from PIL import Image

from symeq_dist.config import DataConfig
from symeq_dist.data import build_eval_batches
from symeq_dist.data.schema import Schema
from symeq_dist.datasets.celeba import CELEBA_ATTRIBUTES, write_celeba_shards
from symeq_dist.datasets.celebamask_hq import MASK_CLASSES
from symeq_dist.datasets.digits_seg import write_digits_seg_shards
from symeq_dist.datasets.folder import write_folder_shards
from symeq_dist.datasets.mnist import read_mnist_5k
from symeq_dist.datasets.packed import write_shards
from symeq_dist.eval.features.classifier import CLASSIFIER_KEYS, load_classifier_features, train_classifier
from symeq_dist.eval.features.inception import (
    INCEPTION_FILE,
    InceptionFeatures,
    _tf_avg_pool,
    inception_state_dict_template,
    load_inception_features,
)
from symeq_dist.eval.features.targets import FLIPS, feature_target, inputs_and_targets
from symeq_dist.eval.run import _classify
from tests.conftest import subprocess_env

# pytorch-fid's FID InceptionV3 with the 1008-class fc, without AuxLogits. Derivation, independent of our code:
# torchvision documents inception_v3 (aux_logits=True, 1000 classes) as 27,161,264 parameters. Its AuxLogits head
# is conv0 768->128 1x1 (98,304 + BN 2*128) + conv1 128->768 5x5 (2,457,600 + BN 2*768) + fc 768->1000
# (768,000 + 1,000) = 3,326,696, absent from the FID net: 23,834,568. The FID fc has 8 more classes, each
# 2048 weights + 1 bias: + 16,392 = 23,850,960 ("about 23.9M"). The FID blocks (A, C, E_1, E_2) only change
# pooling, which has no parameters. BatchNorm running statistics are buffers, not parameters.
FID_INCEPTION_PARAMETERS = 27_161_264 - (98_304 + 256 + 2_457_600 + 1_536 + 768_000 + 1_000) + 8 * 2049
assert FID_INCEPTION_PARAMETERS == 23_850_960


def _inception_weights() -> Path | None:
    env = os.environ.get("SYMEQ_INCEPTION_WEIGHTS")
    home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    for path in (Path(env) if env else None, home / "hub" / "checkpoints" / INCEPTION_FILE):
        if path is not None and path.is_file():
            return path
    return None


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """800 train / 200 valid real MNIST digits (a random subset of MNIST-5k) as packed shards."""
    images, labels = read_mnist_5k()
    order = np.random.default_rng(0).permutation(len(labels))
    train, valid = order[:800], order[800:1000]
    out = tmp_path_factory.mktemp("tiny") / "shards"
    write_shards(out, {"train": (images[train], labels[train]), "valid": (images[valid], labels[valid])},
                 dataset="tiny", samples_per_shard=400, meta={})
    return out


@pytest.fixture(scope="module")
def random_inception() -> InceptionFeatures:
    torch.manual_seed(0)
    return InceptionFeatures().eval()


def _digits(num: int) -> torch.Tensor:
    images, _ = read_mnist_5k()
    return torch.from_numpy(images[::5000 // num][:num]).unsqueeze(1).float() / 255.0  # (num, 1, 28, 28)


# ---------------------------------------------------------------- classifier

def test_classifier_end_to_end(tiny_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "classifier.pt"
    info = train_classifier(tiny_shards, out, epochs=2, batch_size=64, feature_dim=32, progress=False)
    assert info["path"] == str(out) and info["num_train"] == 800 and info["num_valid"] == 200
    assert info["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert re.fullmatch(r"FD-clf-[0-9a-f]{8}", info["name"]) and info["name"] == f"FD-clf-{info['sha256'][:8]}"
    assert 0.5 < info["valid_accuracy"] <= 1.0  # chance is 0.1
    assert [p.name for p in out.parent.iterdir()] == ["classifier.pt"]  # the temporary file is gone
    checkpoint = torch.load(out, weights_only=True)
    assert set(checkpoint) == set(CLASSIFIER_KEYS) and checkpoint["image_shape"] == [1, 28, 28]
    assert checkpoint["num_classes"] == 10 and checkpoint["dataset"] == "tiny" and checkpoint["epochs"] == 2

    features = load_classifier_features(out)
    assert features.name == info["name"] and features.dim == 32 and not features.training
    assert features.valid_accuracy == info["valid_accuracy"] and features.sha256 == info["sha256"]
    assert all(not p.requires_grad for p in features.parameters())
    with torch.no_grad():
        embedded = features(_digits(6))
    assert embedded.shape == (6, 32) and embedded.dtype == torch.float32 and torch.isfinite(embedded).all()
    assert embedded.std(0).max() > 0  # different digits, different features
    with torch.no_grad():
        assert features.classify(_digits(6)).shape == (6, 10)
    assert features.info() == {"name": info["name"], "kind": "classifier", "dim": 32, "sha256": info["sha256"],
                               "path": str(out), "target": "class", "target_names": [str(k) for k in range(10)],
                               "target_description": "10 classes (softmax, cross-entropy)", "accuracy_split": "valid",
                               "valid_accuracy": info["valid_accuracy"], "dataset": "tiny", "epochs": 2, "seed": 0}
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        features(torch.rand(2, 1, 32, 32))
    off_grid = _digits(6) * 1.4 - 0.2  # (6, 1, 28, 28): like Gaussian-x means, outside [0, 1] and between levels
    with torch.no_grad():  # embedded as their 8-bit image, like FID's inputs
        assert torch.equal(features(off_grid), features(torch.round(off_grid.clamp(0, 1) * 255) / 255))
        assert not torch.equal(features(off_grid), features.net.body(off_grid))


def test_classifier_deterministic_under_seed(tiny_shards: Path, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    runs = [train_classifier(tiny_shards, tmp_path / name, epochs=1, seed=seed, feature_dim=16, progress=False)
            for name, seed in (("a.pt", 3), ("b.pt", 3), ("c.pt", 4))]
    assert runs[0]["sha256"] == runs[1]["sha256"]  # bytes do not depend on the file name
    assert runs[0]["sha256"] != runs[2]["sha256"]
    assert torch.get_num_threads() == threads  # trained on num_threads=1, then the caller's count is restored


@pytest.mark.slow
def test_classifier_on_mnist_5k(mnist_shards: Path, tmp_path: Path) -> None:
    """The default recipe (5 epochs) on the real MNIST-5k training split reaches >= 95% on its 500 held out."""
    info = train_classifier(mnist_shards, tmp_path / "classifier.pt", progress=False)
    assert info["num_train"] == 4500 and info["num_valid"] == 500 and info["epochs"] == 5
    assert info["valid_accuracy"] >= 0.95
    assert load_classifier_features(info["path"]).dim == 128


# In a fresh process: one epoch on a small split first (torch's lazy imports and Adam, ~175 MB), then the peak
# RSS growth (KiB) over one epoch on the large split, of this process and of its children (the stream's
# DataLoader worker, which reads and decodes), against this process's peak before. A fixed glibc mmap
# threshold returns freed activations to the OS at once: with the default dynamic one, heap fragmentation
# alone made the peak wander by up to ~40 MB between runs (measured).
_PEAK_RSS_SCRIPT = """
import json, resource, sys
from symeq_dist.eval.features.classifier import train_classifier
train_classifier(sys.argv[1], sys.argv[3], epochs=1, feature_dim=16, progress=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
info = train_classifier(sys.argv[2], sys.argv[3], epochs=1, feature_dim=16, progress=False)
self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
children_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss - before
print(json.dumps({"self_kib": self_kib, "children_kib": children_kib, "valid_accuracy": info["valid_accuracy"]}))
"""


def _patch_shards(out: Path, num_train: int, num_valid: int) -> None:
    """Learnable 3 x 32 x 32 images: uniform noise in 0..127 plus a bright 8 x 8 patch at the label's place."""
    rng = np.random.default_rng(0)
    num = num_train + num_valid
    labels = rng.integers(0, 10, num)
    images = rng.integers(0, 128, (num, 3, 32, 32), dtype=np.uint8)
    for label in range(10):
        row, col = divmod(label, 4)
        images[labels == label, :, 8 * row:8 * row + 8, 8 * col:8 * col + 8] += 128
    splits = {"train": (images[:num_train], labels[:num_train]), "valid": (images[num_train:], labels[num_train:])}
    write_shards(out, splits, dataset="patches", samples_per_shard=2048, samples_per_member=64, meta={})


def test_classifier_streams_the_training_split(tmp_path: Path) -> None:
    """Training does not hold the split in memory: peak RSS grows far less than the split's float32 size."""
    num_train = 8_000
    _patch_shards(tmp_path / "small", 512, 100)
    _patch_shards(tmp_path / "large", num_train, 500)
    split_kib = num_train * 3 * 32 * 32 * 4 // 1024  # 96,000 KiB as float32
    args = [str(tmp_path / name) for name in ("small", "large", "classifier.pt")]
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS_SCRIPT, *args],
                          env=subprocess_env(MALLOC_MMAP_THRESHOLD_="131072"), capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["valid_accuracy"] > 0.5  # it did learn (chance is 0.1)
    assert max(result["self_kib"], result["children_kib"]) < split_kib / 8, (result, split_kib)  # measured ~1.5 MB


def test_classifier_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="symeq eval train-features"):
        load_classifier_features(tmp_path / "classifier.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(ValueError, match=r"not a classifier checkpoint.*symeq eval train-features"):
        load_classifier_features(junk)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}, "epochs": 1}, other)
    with pytest.raises(ValueError, match="lacks"):
        load_classifier_features(other)
    torch.save(dict.fromkeys(CLASSIFIER_KEYS, 1) | {"state_dict": {}, "image_shape": [1, 28, 28]}, other)
    with pytest.raises(ValueError, match="does not fit the classifier"):
        load_classifier_features(other)


def test_classifier_without_valid_split_reports_train_accuracy(tmp_path: Path) -> None:
    """No 'valid' split (`symeq shards folder` writes none by default): accuracy on 'train', said so; 64 < 1 batch."""
    images, labels = read_mnist_5k()
    write_shards(tmp_path, {"train": (images[:64], labels[:64])}, dataset="tiny", samples_per_shard=64, meta={})
    info = train_classifier(tmp_path, tmp_path / "classifier.pt", epochs=1, progress=False)
    assert info["accuracy_split"] == "train" and info["target"] == "class" and 0 <= info["valid_accuracy"] <= 1
    assert load_classifier_features(info["path"]).info()["accuracy_split"] == "train"


# ---------------------------------------------------------------- feature networks for every schema

@pytest.fixture(scope="module")
def seg_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits-seg: 1-3 real MNIST glyphs per 28 x 28 canvas, label maps, no class labels."""
    out = tmp_path_factory.mktemp("seg") / "shards"
    write_digits_seg_shards(out, canvas=28, num_train=512, num_valid=128, samples_per_shard=256)
    return out


@pytest.fixture(scope="module")
def celeba_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A miniature CelebA (noise images, the 40 real attribute names): 16 x 16 RGB, attributes, no classes."""
    out = tmp_path_factory.mktemp("celeba") / "shards"
    write_celeba_shards(make_celeba_tree(tmp_path_factory.mktemp("celeba_tree"), 45), out, size=16, image_format="png",
                        samples_per_shard=8)
    return out


@pytest.fixture(scope="module")
def folder_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Plain folder shards (no labels, masks or valid split): 160 grey noise images with a bright bar at the top."""
    root, rng = tmp_path_factory.mktemp("folder_tree"), np.random.default_rng(0)
    for i in range(160):
        image, start = rng.integers(0, 96, (20, 20), dtype=np.uint8), int(rng.integers(0, 8))
        image[1:4, start:start + int(rng.integers(8, 13))] = 255  # the orientation is learnable
        Image.fromarray(image).save(root / f"{i:03d}.png")
    out = tmp_path_factory.mktemp("folder") / "shards"
    write_folder_shards(root, out, size=16, grey=True, image_format="png", samples_per_shard=64)
    return out


def test_feature_target_follows_the_schema() -> None:
    """Class labels -> softmax; attributes (also beside a mask) -> multi-label; a mask alone -> the classes present
    (background left out); nothing -> rotation prediction (shape-keeping flips for non-square images)."""
    def target(**schema: object) -> tuple[str, tuple[str, ...], bool]:
        found = feature_target(Schema(**schema).to_manifest())  # type: ignore[arg-type]
        return found.kind, found.names, found.multi_label
    assert target(image_shape=(1, 28, 28), num_classes=10) == ("class", tuple(map(str, range(10))), False)
    assert target(image_shape=(3, 64, 64), attributes=CELEBA_ATTRIBUTES) == ("attributes", CELEBA_ATTRIBUTES, True)
    assert target(image_shape=(3, 64, 64), attributes=CELEBA_ATTRIBUTES,
                  mask_classes=MASK_CLASSES) == ("attributes", CELEBA_ATTRIBUTES, True)  # CelebAMask-HQ
    assert target(image_shape=(3, 64, 64), mask_classes=MASK_CLASSES) == ("mask_classes", MASK_CLASSES[1:], True)
    assert target(image_shape=(3, 32, 32)) == ("rotation", ("0", "90", "180", "270"), False)
    assert target(image_shape=(3, 32, 48)) == ("rotation", FLIPS, False)
    assert feature_target({"image_shape": [1, 28, 28], "num_classes": 10, "splits": {}}).kind == "class"  # v1
    x = torch.rand(8, 3, 32, 48)  # (B, C, H, W): image i gets transform (i + step) mod 4, each keeps the shape
    flipped, turns = inputs_and_targets(feature_target(Schema(image_shape=(3, 32, 48)).to_manifest()), x, {}, 3)
    assert turns.tolist() == [3, 0, 1, 2] * 2 and torch.equal(flipped[1], x[1])
    assert torch.equal(flipped[2], x[2].flip(1)) and torch.equal(flipped[4], x[4].flip(1, 2))


def test_feature_network_on_digits_seg_learns_the_classes_in_the_mask(seg_shards: Path, tmp_path: Path) -> None:
    info = train_classifier(seg_shards, tmp_path / "classifier.pt", epochs=8, batch_size=32, feature_dim=32,
                            progress=False)
    assert info["target"] == "mask_classes" and info["accuracy_split"] == "valid" and info["num_valid"] == 128
    present = torch.cat([torch.stack([(batch["mask"].flatten(1) == k + 1).any(1) for k in range(10)], 1)
                         for batch in build_eval_batches(DataConfig(shards=str(seg_shards), num_workers=0),
                                                         split="valid", batch_size=64)])  # (128, 10)
    all_absent = 1 - present.float().mean().item()  # the constant answer's accuracy (1-3 of 10 digits: ~0.82)
    assert all_absent + 0.03 < info["valid_accuracy"] <= 1.0, (info["valid_accuracy"], all_absent)
    features = load_classifier_features(info["path"])
    assert features.target == features.info()["target"] == "mask_classes" and features.name == info["name"]
    assert features.info()["target_names"] == list("0123456789")  # mask ids 1..10, the background left out
    images = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert features(images).shape == (5, 32) and features.classify(images).shape == (5, 10)
    assert _classify(features, images) is None  # presence logits are no class ids: t-SNE points stay uncoloured


def test_feature_network_on_attribute_shards(celeba_shards: Path, tmp_path: Path) -> None:
    """CelebA's 40 attributes as multi-label targets; its train split (15 images) is smaller than a default batch."""
    info = train_classifier(celeba_shards, tmp_path / "classifier.pt", epochs=2, feature_dim=16, progress=False)
    assert info["target"] == "attributes" and info["accuracy_split"] == "valid" and info["num_train"] == 15
    features = load_classifier_features(info["path"])
    assert features.info()["target"] == "attributes" and features.info()["target_names"] == list(CELEBA_ATTRIBUTES)
    with torch.no_grad():
        assert features(x := torch.rand(3, 3, 16, 16)).shape == (3, 16) and features.classify(x).shape == (3, 40)


def test_feature_network_on_a_plain_folder_is_self_supervised(folder_shards: Path, tmp_path: Path) -> None:
    """No labels, no masks, no valid split: 4-way rotation prediction, its accuracy measured on the train split."""
    info = train_classifier(folder_shards, tmp_path / "classifier.pt", epochs=6, batch_size=32, feature_dim=16,
                            progress=False)
    assert info["target"] == "rotation" and info["accuracy_split"] == "train" and info["num_valid"] == 0
    assert 0.5 < info["valid_accuracy"] <= 1.0, info  # it learned the orientation (chance 0.25)
    features = load_classifier_features(info["path"])
    assert features.info()["target"] == "rotation" and features.info()["accuracy_split"] == "train"
    assert _classify(features, torch.rand(4, 1, 16, 16)) is None  # rotations are no classes of the data


@pytest.mark.parametrize("shards", ["seg_shards", "celeba_shards", "folder_shards"])
def test_feature_networks_are_deterministic_under_the_seed(shards: str, request: pytest.FixtureRequest,
                                                           tmp_path: Path) -> None:
    path = request.getfixturevalue(shards)
    runs = [train_classifier(path, tmp_path / name, epochs=1, seed=seed, batch_size=32, feature_dim=16,
                             progress=False) for name, seed in (("a.pt", 3), ("b.pt", 3), ("c.pt", 4))]
    assert runs[0]["sha256"] == runs[1]["sha256"] and runs[0]["sha256"] != runs[2]["sha256"]
    images = torch.rand(4, *load_classifier_features(runs[0]["path"]).image_shape)
    with torch.no_grad():  # the same features
        assert torch.equal(*(load_classifier_features(r["path"])(images) for r in runs[:2]))


# ---------------------------------------------------------------- Inception

def test_inception_parameter_count() -> None:
    with torch.device("meta"):
        model = InceptionFeatures()
    assert sum(p.numel() for p in model.parameters()) == FID_INCEPTION_PARAMETERS
    template = inception_state_dict_template()
    assert template["fc.weight"] == (1008, 2048) and template["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert template["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert template["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert not any(key.startswith("AuxLogits") or key.endswith("num_batches_tracked") for key in template)
    parameters = sum(v.numel() for k, v in template.items() if not k.endswith(("running_mean", "running_var")))
    assert parameters == FID_INCEPTION_PARAMETERS


def test_tf_average_pool_ignores_padding() -> None:
    """FIDInceptionA/C/E_1 average-pool like TF: a constant map stays constant up to the border."""
    assert torch.equal(_tf_avg_pool(torch.ones(1, 2, 5, 5)), torch.ones(1, 2, 5, 5))


def test_inception_random_init_round_trip(random_inception: InceptionFeatures, tmp_path: Path) -> None:
    grey = _digits(2)
    with torch.no_grad():
        features = random_inception(grey)
    assert features.shape == (2, 2048) and features.dtype == torch.float32 and torch.isfinite(features).all()
    assert random_inception.name == "FID" and random_inception.dim == 2048
    assert features.abs().mean() > 1e-3  # He init: not the vanishing features of torch's default init
    path = tmp_path / INCEPTION_FILE
    state = random_inception.state_dict()
    assert set(inception_state_dict_template()) == {k for k in state if not k.endswith("num_batches_tracked")}
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)  # old-style file
    loaded = load_inception_features(path)
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and not loaded.training
    assert loaded.info() == {"name": "FID", "kind": "inception", "dim": 2048, "sha256": loaded.sha256,
                             "path": str(path)}
    assert all(not p.requires_grad for p in loaded.parameters())
    with torch.no_grad():  # same weights, and grey images are replicated to RGB: the same features
        torch.testing.assert_close(loaded(grey.expand(-1, 3, -1, -1)), features)


def test_inception_clamps_and_quantises(random_inception: InceptionFeatures) -> None:
    """Inputs are clamped to [0, 1] and rounded to multiples of 1/255 first, as the 8-bit PNGs pytorch-fid reads."""
    x = torch.rand(1, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 1.4 - 0.2  # (1, 3, 28, 28)
    png = torch.round(x.clamp(0, 1) * 255) / 255
    assert (x < 0).any() and (x > 1).any() and not torch.equal(png, x.clamp(0, 1))  # off range and off the grid
    with torch.no_grad():
        assert torch.equal(random_inception(x), random_inception(png))


def test_inception_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(INCEPTION_FILE)}.*nothing is downloaded.*"
                                                r"--inception-weights PATH"):
        load_inception_features(tmp_path / INCEPTION_FILE)


def test_inception_wrong_files(tmp_path: Path) -> None:
    # torchvision's ImageNet layout: an AuxLogits head and a 1000-class fc
    torchvision_like = {k: torch.zeros(v) for k, v in inception_state_dict_template().items()}
    torchvision_like["fc.weight"], torchvision_like["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    torchvision_like["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    path = tmp_path / "inception_v3_google.pth"
    torch.save(torchvision_like, path)
    with pytest.raises(ValueError, match=r"1 unexpected keys: AuxLogits\.fc\.weight; 2 keys with wrong shapes: "
                                         r"fc\.bias .*fc\.weight \(1000, 2048\) \(expected \(1008, 2048\)\)"):
        load_inception_features(path)
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=r"472 missing keys: Conv2d_1a_3x3\..*1 unexpected keys: weight"):
        load_inception_features(path)
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="not an Inception state dict"):
        load_inception_features(path)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="holds a list"):
        load_inception_features(path)


@pytest.mark.skipif(_inception_weights() is None,
                    reason=f"no {INCEPTION_FILE}: set SYMEQ_INCEPTION_WEIGHTS or use $TORCH_HOME/hub/checkpoints")
def test_real_inception_weights(tmp_path: Path) -> None:
    path = _inception_weights()
    assert path is not None
    model = load_inception_features(path)
    digits = _digits(4)
    with torch.no_grad():
        features = model(digits)
        logits = model.fc(features)
    assert features.shape == (4, 2048) and torch.isfinite(features).all() and (features >= 0).all()
    assert logits.shape == (4, 1008) and features.std(0).max() > 0
