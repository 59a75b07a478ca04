"""Structured latents (issue 14), the semi-supervised part: a class latent observed for the labelled rows.

Real parts: the class_mlp players, the symmetric game's losses with real gradients, the labelled pool read from
the real MNIST shards, and trainer runs with DeepSpeed engines (resume compared bitwise).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from symeq_dist.api import train as run_training
from symeq_dist.config import ConfigError, PriorConfig, load_config, model_config
from symeq_dist.data.labelled import LabelledPool
from symeq_dist.game import Labelled, Round
from symeq_dist.game.symmetric import SymmetricGame
from symeq_dist.models import build_players
from symeq_dist.models.distributions import Categorical, OneHotCategorical
from symeq_dist.priors import build_prior
from tests.conftest import tiny_overrides

K = 10


def _players():
    torch.manual_seed(0)
    return build_players(model_config("class_mlp", hidden=32, num_latents=4))


def _rows(n: int = 6, mask: float = 1.0) -> Labelled:
    x = (torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1)) > 0.7).float()
    return Labelled(x=x, c=F.one_hot(torch.arange(n) % K, K).float(), mask=torch.full((n,), mask))


def test_one_hot_categorical_matches_categorical() -> None:
    logits = torch.randn(5, K, generator=torch.Generator().manual_seed(0))
    one_hot, plain = OneHotCategorical(logits), Categorical(logits)
    values = torch.tensor([0, 3, 9, 2, 2])
    assert torch.allclose(one_hot.log_prob(F.one_hot(values, K).float()), plain.log_prob(values))
    draws = one_hot.sample(torch.Generator().manual_seed(2))
    assert draws.shape == (5, K) and torch.equal(draws.sum(1), torch.ones(5))
    assert torch.equal(draws.argmax(1), plain.sample(torch.Generator().manual_seed(2)))
    assert torch.equal(one_hot.mode().argmax(1), logits.argmax(1))


def test_a_masked_out_label_makes_its_row_an_unlabelled_row() -> None:
    encoder, decoder = _players()
    rows = _rows(mask=0.0)
    z_free, _ = encoder.sample(rows.x, decoder, torch.Generator().manual_seed(5))
    z_masked, _ = encoder.sample(rows.x, decoder, torch.Generator().manual_seed(5),
                                 observed={"c": rows.c, "c_mask": rows.mask})
    assert all(torch.equal(z_free[k], z_masked[k]) for k in z_free)
    z_clamped, _ = encoder.sample(rows.x, decoder, torch.Generator().manual_seed(5),
                                  observed={"c": rows.c, "c_mask": torch.ones(len(rows.mask))})
    assert torch.equal(z_clamped["c"], rows.c) and not torch.equal(z_clamped["c"], z_free["c"])
    # in the game: labelled rows that are all masked out add exactly the decoder loss of those rows as data
    game = SymmetricGame(_players_pair(encoder, decoder), build_prior(PriorConfig(), decoder))
    plain = game.decoder_loss(Round(x=rows.x, num_dreams=6, gens={"wake": torch.Generator().manual_seed(7)}))
    both = game.decoder_loss(Round(x=rows.x, num_dreams=6, gens={"wake": torch.Generator().manual_seed(7)},
                                   labelled=rows))
    again = game.decoder_loss(Round(x=rows.x, num_dreams=6, gens={"wake": torch.Generator().manual_seed(7)}))
    assert torch.equal(plain.loss, again.loss)
    wake_gen = torch.Generator().manual_seed(7)
    game.decoder_loss(Round(x=rows.x, num_dreams=6, gens={"wake": wake_gen}))  # the wake draws come first
    second = game.decoder_loss(Round(x=rows.x, num_dreams=6, gens={"wake": wake_gen}))  # then the same rows again
    assert torch.allclose(both.loss, plain.loss + second.loss)
    enc = game.encoder_loss(Round(x=rows.x, num_dreams=6, gens={"dream": torch.Generator().manual_seed(8)},
                                  labelled=rows, labelled_wake=None))
    assert "supervised/loss" not in enc.stats  # no labelled completion this round: no supervised term


def _players_pair(encoder, decoder):
    from symeq_dist.models.players import Players

    return Players(encoder=encoder, decoder=decoder)


def test_clamped_classes_train_the_decoder_and_the_encoders_class_head_only_through_the_supervised_term() -> None:
    encoder, decoder = _players()
    game = SymmetricGame(_players_pair(encoder, decoder), build_prior(PriorConfig(), decoder))
    rnd = Round(x=_rows().x, num_dreams=6, gens={"wake": torch.Generator().manual_seed(1),
                                                 "dream": torch.Generator().manual_seed(2)}, labelled=_rows())
    game.decoder_loss(rnd).loss.backward()
    assert all(p.grad is None for p in encoder.parameters()), "the decoder's loss reached the encoder"
    assert all(p.grad is not None for p in decoder.parameters())
    decoder.zero_grad(set_to_none=True)
    terms = game.encoder_loss(rnd)
    assert "supervised/loss" in terms.stats and terms.stats["supervised/loss"] > 0
    terms.loss.backward()
    assert all(p.grad is None for p in decoder.parameters()), "the encoder's loss reached the decoder"
    assert encoder.class_head.weight.grad.abs().sum() > 0
    # the supervised term alone: -log q(c | x) of the labels, mean over the observed rows
    encoder.zero_grad(set_to_none=True)
    q_c = encoder.conditionals(rnd.labelled.x, rnd.labelled_wake.z, decoder)["c"]
    expected = -q_c.log_prob(rnd.labelled.c).mean()
    assert torch.allclose(terms.stats["supervised/loss"], expected.detach())


def test_the_labelled_pool_is_the_same_on_every_rank_draws_equally_and_resumes(mnist_shards: Path) -> None:
    pools = [LabelledPool(mnist_shards, "train", per_class=10, seed=3, rank=r) for r in (0, 1)]
    assert pools[0].counts == [10] * K and len(pools[0]) == 100
    assert torch.equal(pools[0].images, pools[1].images) and torch.equal(pools[0].labels, pools[1].labels)
    other_seed = LabelledPool(mnist_shards, "train", per_class=10, seed=4, rank=0)
    assert not torch.equal(other_seed.images, pools[0].images)  # the seed picks the pool
    a, b = pools[0].draw(16), pools[1].draw(16)
    assert a["image"].shape == b["image"].shape == (16, 1, 28, 28) and not torch.equal(a["label"], b["label"])
    assert torch.equal(a["c"].argmax(1), a["label"]) and torch.equal(a["c_mask"], torch.ones(16))
    state = pools[0].state_dict()
    ahead = [pools[0].draw(16)["label"] for _ in range(3)]
    resumed = LabelledPool(mnist_shards, "train", per_class=10, seed=3, rank=0)
    resumed.load_state_dict(state, step=1)
    assert all(torch.equal(x, resumed.draw(16)["label"]) for x in ahead)
    everything = LabelledPool(mnist_shards, "train", per_class=-1, seed=3, rank=0)
    assert len(everything) == 4500


def _assert_resumes_exactly(tmp_path: Path, shards: Path, extra: tuple[str, ...]) -> None:
    """6 steps straight (run `full`) and 3 + 3 with a resume (run `cut`) end with bitwise equal weights."""
    run_training(load_config(None, tiny_overrides(tmp_path / "full", shards, *extra, "train.steps=6")))
    run_training(load_config(None, tiny_overrides(tmp_path / "cut", shards, *extra, "train.steps=3")))
    run_training(load_config(None, tiny_overrides(tmp_path / "cut", shards, *extra, "train.steps=6", "resume=true")))
    full, resumed = (torch.load(tmp_path / d / "checkpoints" / "step_00000006" / "weights.pt", weights_only=True)
                     for d in ("full", "cut"))
    for name in ("encoder", "decoder"):
        assert all(torch.equal(v, resumed[name][k]) for k, v in full[name].items()), name


def test_a_semi_supervised_run_resumes_exactly_and_refuses_what_it_cannot_do(tmp_path: Path,
                                                                           mnist_shards: Path) -> None:
    extra = ("model.kind=class_mlp", "model.hidden=32", "model.num_latents=4", "data.labels_per_class=5",
             "data.labelled_batch_size=8", "checkpoint.every=3", "monitor.image_every=100")
    _assert_resumes_exactly(tmp_path, mnist_shards, extra)
    state = torch.load(tmp_path / "cut" / "checkpoints" / "step_00000006" / "rank_00000.pt", weights_only=False)
    assert state["labelled"]["size"] == 50
    with pytest.raises(ConfigError, match=r"elbo is not built for model\.kind=class_mlp"):
        load_config(None, tiny_overrides(tmp_path / "e", mnist_shards, *extra, "game.kind=elbo"))
    with pytest.raises(ConfigError, match=r"data\.labels_per_class: .*model\.kind=mlp"):
        load_config(None, tiny_overrides(tmp_path / "m", mnist_shards, "data.labels_per_class=5"))


def test_eval_reports_the_class_accuracy_and_a_grid_per_class(tmp_path: Path, mnist_shards: Path) -> None:
    from symeq_dist.api import evaluate
    from symeq_dist.data import build_eval_batches, to_float
    from symeq_dist.eval.features.classifier import train_classifier
    from symeq_dist.eval.model import load_trained
    from symeq_dist.eval.options import EvalOptions
    from symeq_dist.sampling import class_conditional

    run = tmp_path / "run"
    run_training(load_config(None, tiny_overrides(run, mnist_shards, "model.kind=class_mlp", "model.hidden=32",
                                                  "model.num_latents=4", "data.labels_per_class=5",
                                                  "data.labelled_batch_size=8", "train.steps=3")))
    features = tmp_path / "clf.pt"
    train_classifier(mnist_shards, features, epochs=1, seed=0, progress=False)
    report = evaluate(EvalOptions(run_dir=run, n=40, chain_steps=2, batch_size=20, tsne_points=20, progress=False,
                                  features=features))
    accuracy = report["class_accuracy"]
    assert accuracy["n"] == 500 and accuracy["split"] == "valid" and accuracy["labels_per_class"] == 5
    model = load_trained(run)
    right = 0
    for batch in build_eval_batches(model.cfg.data, split="valid", batch_size=100):
        x = to_float(batch["image"], model.cfg.data)
        with torch.no_grad():
            logits = model.encoder.class_head(model.encoder.trunk(x))
        right += int((logits.argmax(1) == batch["label"]).sum())
    assert accuracy["accuracy"] == right / 500  # argmax q(c | x), computed here by hand
    assert (run / "eval" / "classes.png").is_file() and report["figures"]["classes"] == "classes.png"
    assert (run / "eval" / "tsne_classes.png").is_file() and "figures" not in accuracy
    images = class_conditional(model.decoder, 3, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert images.shape == (30, 1, 28, 28)


def test_miou_and_pixel_accuracy_match_a_hand_computed_example() -> None:
    """3 classes; target and prediction of 2 maps of 2x3 pixels (12 pixels). The (target, predicted) pairs:
    map 1 (0,0) (0,0) (1,1) (1,0) (2,2) (2,2); map 2 (0,0) (0,1) (1,1) (2,2) (2,1) (0,1). By hand:
    class 0: TP 3, FP 1, FN 2 -> IoU 3/6; class 1: TP 2, FP 3, FN 1 -> 2/6; class 2: TP 3, FP 0, FN 1 -> 3/4.
    mIoU = (1/2 + 1/3 + 3/4) / 3; pixel accuracy 8/12. A 4th class that never occurs stays out of the mean."""
    from symeq_dist.eval.segmentation import Confusion

    target = torch.tensor([[[0, 0, 1], [1, 2, 2]], [[0, 0, 1], [2, 2, 0]]])
    predicted = torch.tensor([[[0, 0, 1], [0, 2, 2]], [[0, 1, 1], [2, 1, 1]]])
    conf = Confusion(4)
    conf.update(predicted[:1], target[:1])
    conf.update(predicted[1:], target[1:])  # accumulated over batches
    assert conf.pixel_accuracy() == pytest.approx(8 / 12)
    assert conf.iou()[:3].tolist() == pytest.approx([3 / 6, 2 / 6, 3 / 4]) and torch.isnan(conf.iou()[3])
    assert conf.mean_iou() == pytest.approx((1 / 2 + 1 / 3 + 3 / 4) / 3)
    with pytest.raises(ValueError, match="differ in shape"):
        conf.update(predicted, target[:1])


def _attribute_sample(record: dict):
    """A 28 x 28 image whose quadrant k is bright exactly when attribute k is 1 (plus noise)."""
    import numpy as np

    from symeq_dist.data.schema import Sample

    rng = np.random.default_rng(record["index"])
    bits = rng.integers(0, 2, 4, dtype=np.uint8)
    image = rng.integers(0, 60, (1, 28, 28), dtype=np.uint8)
    for k, bit in enumerate(bits):
        if bit:
            image[0, 14 * (k // 2):14 * (k // 2) + 14, 14 * (k % 2):14 * (k % 2) + 14] += 180
    return Sample(image=image, label=bits)


@pytest.fixture(scope="module")
def attribute_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from symeq_dist.data.schema import Schema
    from symeq_dist.datasets.convert import convert

    out = tmp_path_factory.mktemp("attributes") / "quadrants"
    splits = {split: [{"index": offset + i} for i in range(n)] for split, n, offset in (("train", 96, 0),
                                                                                       ("valid", 32, 96))}
    convert(out, dataset="quadrants", splits=splits, make_sample=_attribute_sample,
            schema=Schema(image_shape=(1, 28, 28), attributes=("q0", "q1", "q2", "q3")), samples_per_shard=32,
            workers=1, meta={})
    return out


def test_attribute_bits_as_observed_latents_resume_exactly_and_are_scored(tmp_path: Path,
                                                                         attribute_shards: Path) -> None:
    from symeq_dist.data import build_eval_batches, to_float
    from symeq_dist.errors import InputError
    from symeq_dist.eval.classes import class_report
    from symeq_dist.eval.model import load_trained
    from symeq_dist.eval.options import EvalOptions

    extra = ("model.kind=class_mlp", "model.label=attributes", "model.num_classes=4", "model.hidden=32",
             "model.num_latents=4", "data.binarize_threshold=128", "data.labelled_fraction=0.25",
             "data.labelled_batch_size=8", "checkpoint.every=3", "monitor.image_every=100")
    _assert_resumes_exactly(tmp_path, attribute_shards, extra)
    pool = LabelledPool(attribute_shards, "train", fraction=0.25, observed="attributes", seed=0, rank=0)
    rows = pool.draw(5)
    assert len(pool) == 24 and rows["c"].shape == (5, 4) and torch.equal(rows["c"], rows["label"])
    model = load_trained(tmp_path / "full")
    section = class_report(model, EvalOptions(run_dir=tmp_path / "full", batch_size=16), tmp_path)
    right, total = torch.zeros(4), 0
    for batch in build_eval_batches(model.cfg.data, split="valid", batch_size=32):
        with torch.no_grad():
            logits = model.encoder.class_head(model.encoder.trunk(to_float(batch["image"], model.cfg.data)))
        right += ((logits > 0) == batch["label"].bool()).sum(0)
        total += len(logits)
    assert section["n"] == 32 and section["per_attribute"]["q2"] == float(right[2] / total)
    assert section["attribute_accuracy"] == pytest.approx(float(right.mean() / total))
    from symeq_dist.api import evaluate
    from symeq_dist.eval.features.classifier import train_classifier

    train_classifier(attribute_shards, tmp_path / "clf.pt", epochs=1, seed=0, progress=False)
    report = evaluate(EvalOptions(run_dir=tmp_path / "full", n=16, chain_steps=2, batch_size=16, tsne_points=8,
                                  progress=False, features=tmp_path / "clf.pt"))
    assert report["class_accuracy"]["attribute_accuracy"] == section["attribute_accuracy"]
    assert "## Attribute latent" in (tmp_path / "full" / "eval" / "report.md").read_text()
    with pytest.raises(ConfigError, match=r"data\.labels_per_class: attributes are labelled by fraction"):
        load_config(None, tiny_overrides(tmp_path / "x", attribute_shards, *extra, "data.labels_per_class=5"))
    with pytest.raises((ConfigError, InputError), match=r"model\.num_classes=3: .* have 4 attributes"):
        run_training(load_config(None, tiny_overrides(tmp_path / "k", attribute_shards, *extra, "train.steps=1",
                                                      "model.num_classes=3")))
