"""The image + segmentation model (issue 14, METHOD §7.6): model.kind=seg_hvae, label maps as a partially observed
top latent, pi(s) from masks, and its section of `symeq eval`.

Real parts: the seg_hvae players with real gradients, digits-seg shards written by the real converter, trainer runs
with DeepSpeed engines (1 process, and 2 processes under torchrun at ZeRO-2, resume compared bitwise), and the
evaluation reading the checkpoints back.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from symeq_dist.api import train as run_training
from symeq_dist.config import ConfigError, PriorConfig, StageConfig, load_config, model_config
from symeq_dist.data.labelled import LabelledPool, label_map_pool
from symeq_dist.errors import InputError
from symeq_dist.game import Labelled, Round
from symeq_dist.game import base as game
from symeq_dist.game.symmetric import SymmetricGame
from symeq_dist.models import build_players
from symeq_dist.priors import MaskPrior
from tests.conftest import ROOT, torchrun_train

K = 11
STAGES = (StageConfig(resolution=1, width=16, groups=1), StageConfig(resolution=4, width=16, groups=1),
          StageConfig(resolution=8, width=8, groups=1), StageConfig(resolution=16, width=8, groups=0))


def _players():
    torch.manual_seed(0)
    cfg = model_config("seg_hvae", image_shape=(1, 16, 16), stages=STAGES, latent_channels=2, seg_width=8)
    return build_players(cfg)


def _maps(n: int = 4, seed: int = 1) -> torch.Tensor:
    """One-hot label maps (n, K, 16, 16): a random class per 4 x 4 block."""
    blocks = torch.randint(K, (n, 4, 4), generator=torch.Generator().manual_seed(seed))
    return F.one_hot(blocks.repeat_interleave(4, 1).repeat_interleave(4, 2), K).movedim(-1, 1).float()


class _Maps:
    """pi(s) for the unit tests: fixed maps, drawn with the caller's generator."""

    shape, family, has_density = (K, 16, 16), "categorical", False

    def sample(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return _maps(n, int(torch.randint(1000, (1,), generator=generator)))

    next_codes = sample


def test_every_group_and_the_map_detach_across_players_and_labelled_maps_train_the_segmentation_head() -> None:
    encoder, decoder = _players()
    assert decoder.latent_names == ("s", "z0", "z1", "z2") and decoder.latent_shapes["s"] == (K, 16, 16)
    dreams = game.dream(decoder, _Maps(), 4, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert dreams.z["s"].shape == (4, K, 16, 16) and set(dreams.dists) == {"z0", "z1", "z2", "x"}
    from symeq_dist.game.symmetric import decoder_loss, encoder_loss

    encoder_loss(encoder, decoder, dreams).loss.backward()
    assert all(p.grad is None for p in decoder.parameters()), "the encoder's loss reached the decoder"
    heads = [*encoder.posteriors, encoder.seg_out]
    assert all(next(iter(h.parameters())).grad.abs().sum() > 0 for h in heads)  # q(s|x) and every group's q
    encoder.zero_grad(set_to_none=True)
    x = dreams.x
    wake = game.complete_data(encoder, decoder, x, torch.Generator().manual_seed(2))
    assert all(not v.requires_grad for v in wake.z.values()) and wake.z["s"].shape == (4, K, 16, 16)
    decoder_loss(decoder, wake).loss.backward()
    assert all(p.grad is None for p in encoder.parameters()), "the decoder's loss reached the encoder"
    assert all(next(iter(h.parameters())).grad.abs().sum() > 0 for h in decoder.priors)  # z0 has a prior p(z0|s)
    assert decoder.mask_stem.weight.grad.abs().sum() > 0
    decoder.zero_grad(set_to_none=True)
    # a labelled round: the decoder trains on the clamped maps, the encoder adds -log q(s | x) of them
    rows = Labelled(x=x, c=_maps(4, seed=9), mask=torch.ones(4))
    players = build_players.__globals__["Players"](encoder=encoder, decoder=decoder)
    sym = SymmetricGame(players, _Maps())
    rnd = Round(x=x, num_dreams=4, gens={"wake": torch.Generator().manual_seed(3),
                                         "dream": torch.Generator().manual_seed(4)}, labelled=rows)
    sym.decoder_loss(rnd).loss.backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert torch.equal(rnd.labelled_wake.z["s"], rows.c)
    decoder.zero_grad(set_to_none=True)
    terms = sym.encoder_loss(rnd)
    q_s = encoder.segment(x)
    assert torch.allclose(terms.stats["supervised/loss"], -q_s.log_prob(rows.c).mean().detach())
    terms.loss.backward()
    assert all(p.grad is None for p in decoder.parameters())


def test_a_masked_out_map_makes_its_row_an_unlabelled_row() -> None:
    encoder, decoder = _players()
    x = (torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.7).float()
    free, _ = encoder.sample(x, decoder, torch.Generator().manual_seed(5))
    masked, _ = encoder.sample(x, decoder, torch.Generator().manual_seed(5),
                               observed={"s": _maps(), "s_mask": torch.zeros(4)})
    assert all(torch.equal(free[k], masked[k]) for k in free)
    half, _ = encoder.sample(x, decoder, torch.Generator().manual_seed(5),
                             observed={"s": _maps(), "s_mask": torch.tensor([1.0, 0.0, 1.0, 0.0])})
    assert torch.equal(half["s"][0::2], _maps()[0::2]) and torch.equal(half["s"][1::2], free["s"][1::2])
    assert not torch.equal(half["z0"][0::2], free["z0"][0::2])  # the groups follow the clamped map


@pytest.fixture(scope="module")
def seg32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from symeq_dist.datasets.digits_seg import write_digits_seg_shards

    out = tmp_path_factory.mktemp("seg") / "digits32"
    write_digits_seg_shards(out, canvas=32, num_train=64, num_valid=16, max_glyphs=2, samples_per_shard=32)
    return out


def test_the_label_map_pool_is_fixed_per_data_set_and_the_mask_prior_draws_its_maps(
        tmp_path: Path, seg32: Path, mnist_shards: Path) -> None:
    from symeq_dist.datasets.digits_seg import write_digits_seg_shards

    other_layout = tmp_path / "layout"
    write_digits_seg_shards(other_layout, canvas=32, num_train=64, num_valid=16, max_glyphs=2, samples_per_shard=7)
    images, maps, classes = label_map_pool(seg32, "train", 0.25)
    assert images.shape == (16, 1, 32, 32) and maps.shape == (16, 32, 32) and classes == K
    again = label_map_pool(other_layout, "train", 0.25)
    assert torch.equal(again[0], images) and torch.equal(again[1], maps)  # the layout does not pick the pool
    assert ((images[:, 0] >= 112) == (maps > 0)).all()  # each map belongs to its own image
    pools = [LabelledPool(seg32, "train", fraction=0.25, seed=s, rank=r) for s, r in ((0, 0), (0, 1), (7, 0))]
    assert all(torch.equal(p.labels, maps) for p in pools)  # every rank and every run seed: the same pool
    rows = pools[0].draw(5)
    assert rows["c"].shape == (5, K, 32, 32) and torch.equal(rows["c"].argmax(1), rows["label"])
    prior = MaskPrior(PriorConfig(kind="masks", shards=str(seg32), mask_fraction=0.25))
    drawn = prior.sample(40, torch.Generator().manual_seed(3), torch.device("cpu")).argmax(1)
    assert prior.shape == (K, 32, 32) and all(any(torch.equal(d, m) for m in maps) for d in drawn)
    assert prior._maps is pools[2].labels  # the prior and the pool of a run share one read of the split
    assert torch.equal(drawn, prior.next_codes(40, torch.Generator().manual_seed(3), torch.device("cpu")).argmax(1))
    with pytest.raises(InputError, match="no label maps"):
        label_map_pool(mnist_shards, "train", 0.5)


def seg_overrides(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    """A 32x32 seg_hvae smoke run on digits-seg canvases, a quarter of them labelled."""
    stages = "[{resolution: 1, width: 16, groups: 1}, {resolution: 4, width: 16, groups: 1}, " \
             "{resolution: 8, width: 8, groups: 1}, {resolution: 16, width: 8, groups: 0}, " \
             "{resolution: 32, width: 8, groups: 0}]"
    return [f"run_dir={run_dir}", f"data.shards={shards}", "data.num_workers=0", "model.kind=seg_hvae",
            "model.image_shape=[1,32,32]", f"model.stages={stages}", "model.latent_channels=2", "model.seg_width=8",
            "prior.kind=masks", "data.labelled_fraction=0.25", "data.labelled_batch_size=4",
            "train.batch_size=8", "monitor.log_every=1", "monitor.image_every=100", "monitor.num_grid=4",
            "monitor.progress=false", "sampling.num_chains=2", "train.ema_decay=0.9",
            f"engines.ds_config={ROOT / 'ds_config.json'}", *extra]


def test_configs_name_what_the_segmentation_model_needs(tmp_path: Path, seg32: Path) -> None:
    cfg = load_config(None, seg_overrides(tmp_path, seg32))
    assert (cfg.prior.shards, cfg.prior.mask_fraction) == (str(seg32), 0.25)  # resolved, and saved so
    with pytest.raises(ConfigError, match=r"prior\.kind: model\.kind=seg_hvae .* prior\.kind=masks"):
        load_config(None, seg_overrides(tmp_path, seg32, "prior.kind=auto"))
    with pytest.raises(ConfigError, match=r"game\.kind: elbo is not built for model\.kind=seg_hvae"):
        load_config(None, seg_overrides(tmp_path, seg32, "game.kind=elbo"))
    with pytest.raises(ConfigError, match=r"data\.labelled_fraction: .*model\.kind=mlp"):
        load_config(None, [f"data.shards={seg32}", "data.labelled_fraction=0.5"])
    with pytest.raises(ConfigError, match=r"prior\.mask_fraction"):
        load_config(None, seg_overrides(tmp_path, seg32, "prior.mask_fraction=1.5"))
    assert load_config(ROOT / "configs" / "digits_seg_symeq.yaml").prior.mask_fraction == 0.1


def test_eval_reports_the_segmentation_scores_and_the_figure_grids(tmp_path: Path, seg32: Path) -> None:
    from symeq_dist.api import evaluate
    from symeq_dist.data import build_eval_batches, to_float
    from symeq_dist.eval.features.classifier import train_classifier
    from symeq_dist.eval.model import load_trained
    from symeq_dist.eval.options import EvalOptions
    from symeq_dist.eval.segmentation import Confusion

    run = tmp_path / "run"
    run_training(load_config(None, seg_overrides(run, seg32, "train.steps=2", "checkpoint.every=2")))
    features = tmp_path / "clf.pt"  # the digits-seg feature network: which mask classes a canvas holds
    train_classifier(seg32, features, epochs=1, seed=0, progress=False)
    report = evaluate(EvalOptions(run_dir=run, n=16, chain_steps=2, batch_size=8, tsne_points=8, progress=False,
                                  features=features))
    seg = report["segmentation"]
    assert seg["n"] == 16 and seg["split"] == "valid" and seg["labelled_fraction"] == 0.25
    model = load_trained(run)
    confusion = Confusion(K)
    for batch in build_eval_batches(model.cfg.data, split="valid", batch_size=16):
        with torch.no_grad():
            confusion.update(model.encoder.segment(to_float(batch["image"], model.cfg.data)).logits.argmax(1),
                             batch["mask"])
    assert seg["miou"] == confusion.mean_iou() and seg["pixel_accuracy"] == confusion.pixel_accuracy()
    assert 0 <= seg["cycle_miou"] <= 1 and 0 <= seg["cycle_pixel_accuracy"] <= 1
    for name in ("style_transfer.png", "segmentation_rows.png"):
        assert (run / "eval" / name).is_file()
    assert "## Segmentation" in (run / "eval" / "report.md").read_text()
    assert report["diagnostics"]["codes"]["skipped"].startswith(f"{K * 32 * 32} dimensions")


@pytest.mark.dist
def test_two_processes_at_zero2_train_and_resume_exactly(tmp_path: Path, seg32: Path) -> None:
    """Both players at ZeRO-2 on 2 processes: 4 steps straight, and 2 + 2 with a resume, end bitwise equal."""
    from symeq_dist.runtime import checkpoint

    zero2 = ("engines.decoder.zero_stage=2", "engines.encoder.zero_stage=2", "checkpoint.every=2")
    torchrun_train(seg_overrides(tmp_path / "full", seg32, *zero2, "train.steps=4"))
    torchrun_train(seg_overrides(tmp_path / "cut", seg32, *zero2, "train.steps=2"))
    torchrun_train(seg_overrides(tmp_path / "cut", seg32, *zero2, "train.steps=4", "resume=true"))
    full, cut = (checkpoint.read_weights(checkpoint.step_dir(tmp_path / n, 4)) for n in ("full", "cut"))
    for player in ("encoder", "decoder"):
        assert full[player].keys() == cut[player].keys()
        for key, value in full[player].items():
            assert torch.equal(cut[player][key], value), f"{player}.{key}"
    first = checkpoint.read_weights(checkpoint.step_dir(tmp_path / "full", 2))
    assert not torch.equal(first["encoder"]["seg_out.3.weight"], full["encoder"]["seg_out.3.weight"])  # it trained
    states = [torch.load(checkpoint.step_dir(tmp_path / "cut", 4) / f"rank_{r:05d}.pt", weights_only=False)
              for r in (0, 1)]
    assert all(s["labelled"]["size"] == 16 for s in states)
    assert not torch.equal(states[0]["labelled"]["gen"], states[1]["labelled"]["gen"])  # each rank draws its own
