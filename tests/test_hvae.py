"""The hierarchical VAE family (`model.kind=hvae`): shapes, the detaching rule for every latent group, one
decoder call per encoder pass, the logistic-mixture likelihood, and short real runs of both games."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from symeq_dist import game
from symeq_dist.api import train as run_training
from symeq_dist.config import PriorConfig, load_config, model_config
from symeq_dist.config.models import StageConfig
from symeq_dist.datasets.packed import write_shards
from symeq_dist.models import build_players
from symeq_dist.models.logistic_mixture import DiscretizedLogisticMixture, num_params
from symeq_dist.priors import build_prior
from tests.conftest import ROOT, torchrun_train

STAGES = (StageConfig(resolution=1, width=16, groups=1), StageConfig(resolution=4, width=16, groups=2),
          StageConfig(resolution=8, width=8, groups=1), StageConfig(resolution=16, width=8, groups=1))


def tiny(**fields: object):
    return model_config("hvae", image_shape=(1, 16, 16), stages=STAGES, latent_channels=2, **fields)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(cfg, num: int = 4) -> torch.Tensor:
    x = torch.rand(num, *cfg.image_shape, generator=gen(5))
    return (x < 0.3).float() if cfg.x_dist == "bernoulli" else torch.round(x * 255) / 255


@pytest.mark.parametrize("fields", [{}, {"latent": "bernoulli"}, {"x_dist": "logistic_mixture", "num_mixtures": 3},
                                    {"x_dist": "gaussian"}], ids=["gaussian-z", "bernoulli-z", "dmol-x", "gauss-x"])
def test_every_group_detaches_across_players(fields: dict) -> None:
    """Encoder loss on dreams: gradients for phi only; decoder loss on wake pairs: theta only; ELBO: both."""
    cfg = tiny(**fields)
    torch.manual_seed(0)
    enc, dec = build_players(cfg)
    prior = build_prior(PriorConfig(), dec)
    x = images(cfg)
    assert len(dec.latent_names) == 5 and dec.latent_shapes["z4"] == (2, 16, 16)
    dreams = game.dream(dec, prior, 4, gen(1), x.device)
    game.encoder_loss(enc, dec, dreams).loss.backward()
    assert all(p.grad is None for p in dec.parameters())
    heads = [next(iter(head.parameters())) for head in enc.posteriors]  # every group's posterior head learned
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in heads)
    enc.zero_grad()
    wake = game.complete_data(enc, dec, x, gen(2))
    assert all(not v.requires_grad for v in wake.z.values())
    game.decoder_loss(dec, wake).loss.backward()
    assert all(p.grad is None for p in enc.parameters())
    priors = [next(iter(head.parameters())) for head in dec.priors[1:]]  # every non-top group's prior learned
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in priors)
    dec.zero_grad()
    if cfg.latent == "gaussian":  # ZGR needs no special case, but analytic KLs need q and p of one family
        terms, _ = game.elbo_loss(enc, dec, prior, x, gen(3))
        terms.loss.backward()
        assert all(p.grad is not None for p in enc.posteriors.parameters())
        assert dec.h_init.grad is not None  # theta gets gradients through the shared top-down states


@pytest.mark.parametrize(("sigma_max", "clamp"), [(1.0, 5.0), (0.5, None), (None, 5.0)])
def test_latent_heads_are_bounded(sigma_max: float | None, clamp: float | None) -> None:
    """Every Gaussian head's sigma stays below model.sigma_max and |mu|, |log sigma| below model.soft_clamp, even
    when the heads' last layers are blown up (the scale drift docs/hvae.md measured); null disables each."""
    cfg = tiny(sigma_max=sigma_max, soft_clamp=clamp)
    torch.manual_seed(0)
    enc, dec = build_players(cfg)
    with torch.no_grad():
        for head in [*dec.priors[1:], *enc.posteriors]:
            head.net[-1].weight.mul_(1e4)
            head.net[-1].bias.fill_(50.0)
        z, q = enc.sample(images(cfg), dec, gen(1))
        dists = [*q.values(), *dec.conditionals(z).values()][:-1]  # every group of both players, not x
    assert len(dists) == 2 * 5 - 1  # the top group's prior is pi, not a head
    sigma = torch.cat([d.log_sigma.exp().flatten() for d in dists])
    mu = torch.cat([d.mu.abs().flatten() for d in dists])
    if sigma_max is not None:
        assert sigma.max() <= sigma_max
    if clamp is not None:
        assert mu.max() <= clamp and sigma.min() >= math.exp(-clamp) * 0.99
    if sigma_max is None:
        assert sigma.max() > 100  # the soft clamp alone lets sigma reach ~e^5
    if clamp is None:
        assert mu.max() > 1e3


def test_one_decoder_call_per_encoder_pass() -> None:
    cfg = tiny()
    enc, dec = build_players(cfg)
    calls: list[str] = []
    dec.register_forward_pre_hook(lambda _m, args: calls.append(args[0]))
    x = images(cfg)
    with torch.no_grad():
        z, _ = enc.sample(x, dec, gen(1))
        enc.conditionals(x, z, dec)
        dec.conditionals(z)
    assert calls == ["top_down", "top_down", "conditionals"]  # 5 latent groups, one gathered forward each


def test_sampling_is_reproducible_and_shaped() -> None:
    cfg = tiny(x_dist="logistic_mixture", num_mixtures=2)
    _, dec = build_players(cfg)
    top = torch.randn(3, 2, 1, 1, generator=gen(0))
    with torch.no_grad():
        a = dec.sample(top, gen(4))
        b = dec.sample(top, gen(4))
    assert torch.equal(a[1], b[1]) and a[1].shape == (3, 1, 16, 16)
    assert torch.equal(a[1], torch.round(a[1] * 255) / 255) and a[1].min() >= 0 and a[1].max() <= 1


def test_logistic_mixture_sums_to_one() -> None:
    """Over the 256 values of a grey pixel the probabilities of a 3-component mixture sum to 1."""
    params = torch.randn(1, num_params(1, 3), 1, 1, generator=gen(0)) * 0.5
    levels = torch.arange(256, dtype=torch.float32).reshape(-1, 1, 1, 1) / 255
    dist = DiscretizedLogisticMixture(params.expand(256, -1, -1, -1), 1, 3)
    assert float(dist.log_prob(levels).double().exp().sum()) == pytest.approx(1.0, abs=1e-5)


def test_colour_channels_are_conditionally_normalised() -> None:
    """One RGB component: summing P(r, g, b) over every (g, b) leaves the red channel's own probability P(r)
    (the green and blue logistics, shifted by the channels before them, each sum to 1)."""
    rgb = torch.randn(1, num_params(3, 1), 1, 1, generator=gen(0)) * 0.5  # logit, 3 means, 3 log scales, 3 coeffs
    red = rgb[:, [0, 1, 4]]  # the red channel alone: logit, mean, log scale
    levels = torch.arange(256, dtype=torch.float32) / 255
    for r in (0, 77, 255):
        grid = torch.stack(torch.meshgrid(levels[r].reshape(1), levels, levels, indexing="ij"), -1)
        x = grid.reshape(-1, 3, 1, 1)
        joint = DiscretizedLogisticMixture(rgb.expand(len(x), -1, -1, -1), 3, 1).log_prob(x).double().exp().sum()
        alone = DiscretizedLogisticMixture(red, 1, 1).log_prob(levels[r].reshape(1, 1, 1, 1)).double().exp()
        assert float(joint) == pytest.approx(float(alone), rel=1e-4, abs=1e-9)


def test_logistic_mixture_samples_follow_its_probabilities() -> None:
    params = torch.randn(1, num_params(1, 2), 1, 1, generator=gen(1))
    samples = DiscretizedLogisticMixture(params.expand(100_000, -1, -1, -1), 1, 2).sample(gen(2))
    freq = torch.bincount((samples.flatten() * 255).round().long(), minlength=256).double() / 1e5
    levels = torch.arange(256, dtype=torch.float32).reshape(-1, 1, 1, 1) / 255
    probs = DiscretizedLogisticMixture(params.expand(256, -1, -1, -1), 1, 2).log_prob(levels).double().exp()
    assert 0.5 * (freq - probs).abs().sum() < 0.03  # total variation; sampling noise alone is ~0.02 here


@pytest.fixture(scope="module")
def shards16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Binary-ish 16 x 16 images: random blobs, 10 classes, train 128 / valid 32."""
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("hvae") / "blobs16"
    yy, xx = np.mgrid[:16, :16]
    def blob(n: int) -> np.ndarray:  # (n, 1, 16, 16) uint8: a disc at a random place
        cy, cx, r = rng.integers(4, 12, n), rng.integers(4, 12, n), rng.integers(2, 5, n)
        return ((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2 < r[:, None, None] ** 2)[:, None] * 255
    splits = {s: (blob(n).astype(np.uint8), rng.integers(0, 10, n)) for s, n in (("train", 128), ("valid", 32))}
    write_shards(out, splits, dataset="blobs", samples_per_shard=64, meta={})
    return out


def hvae_overrides(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    stages = "[{resolution: 1, width: 16, groups: 1}, {resolution: 4, width: 16, groups: 2}, " \
             "{resolution: 8, width: 8, groups: 1}, {resolution: 16, width: 8, groups: 1}]"
    return [f"run_dir={run_dir}", f"data.shards={shards}", "data.num_workers=0", "model.kind=hvae",
            "model.image_shape=[1,16,16]", f"model.stages={stages}", "model.latent_channels=2",
            "data.binarize_threshold=128", "train.batch_size=8", "train.steps=3", "monitor.log_every=1",
            "monitor.image_every=3", "monitor.num_grid=4", "monitor.progress=false", "checkpoint.every=3",
            "sampling.num_chains=2", f"engines.ds_config={ROOT / 'ds_config.json'}", *extra]


@pytest.mark.parametrize("kind", ["symmetric", "elbo"])
def test_trains_with_both_games(tmp_path: Path, shards16: Path, kind: str) -> None:
    last = run_training(load_config(None, hvae_overrides(tmp_path / "run", shards16, f"game.kind={kind}",
                                                         "model.checkpoint_cells=true")))
    losses = [v for k, v in last.items() if k.endswith("/loss")]
    assert losses and all(math.isfinite(v) for v in losses)
    assert any(k.startswith("train/encoder/mi/z4") for k in last)  # every group is monitored


@pytest.fixture(scope="module")
def shards32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from symeq_dist.datasets.digits_seg import write_digits_seg_shards

    out = tmp_path_factory.mktemp("hvae") / "digits32"
    write_digits_seg_shards(out, canvas=32, num_train=64, num_valid=16, max_glyphs=1, samples_per_shard=32,
                            workers=1)
    return out


def smoke32(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    """The 32x32 smoke config: 5 latent groups over 1..32, binary canvases of real digits."""
    stages = "[{resolution: 1, width: 16, groups: 1}, {resolution: 4, width: 16, groups: 2}, " \
             "{resolution: 8, width: 16, groups: 1}, {resolution: 16, width: 8, groups: 1}, " \
             "{resolution: 32, width: 8, groups: 0}]"
    return [f"run_dir={run_dir}", f"data.shards={shards}", "data.num_workers=0", "model.kind=hvae",
            "model.image_shape=[1,32,32]", f"model.stages={stages}", "model.latent_channels=2",
            "train.batch_size=8", "monitor.log_every=1", "monitor.image_every=100", "monitor.num_grid=4",
            "monitor.progress=false", "sampling.num_chains=2", "engines.encoder.lr=1e-3", "engines.decoder.lr=1e-3",
            "train.ema_decay=0.9",
            f"engines.ds_config={ROOT / 'ds_config.json'}", *extra]


@pytest.mark.dist
def test_sharded_checkpointed_run_equals_the_plain_run_and_resumes_exactly(tmp_path: Path, shards32: Path) -> None:
    """2 processes: decoder at ZeRO-3 with activation checkpointing + encoder at ZeRO-1 ends with the weights (and
    weight averages, kept per ZeRO-3 partition) of the same run at ZeRO-0 without checkpointing (fp tolerance);
    stopped at step 2 and resumed, it ends bitwise where it would have ended uninterrupted."""
    from symeq_dist.runtime import checkpoint

    sharded = ("engines.decoder.zero_stage=3", "engines.encoder.zero_stage=1", "model.checkpoint_cells=true")
    plain = ("engines.decoder.zero_stage=0", "engines.encoder.zero_stage=0")
    torchrun_train(smoke32(tmp_path / "sharded", shards32, *sharded, "train.steps=4", "checkpoint.every=2"))
    torchrun_train(smoke32(tmp_path / "plain", shards32, *plain, "train.steps=4", "checkpoint.every=2"))
    torchrun_train(smoke32(tmp_path / "cut", shards32, *sharded, "train.steps=2", "checkpoint.every=2"))
    torchrun_train(smoke32(tmp_path / "cut", shards32, *sharded, "train.steps=4", "checkpoint.every=2", "resume=true"))
    weights = {name: checkpoint.read_weights(checkpoint.step_dir(tmp_path / name, 4))
               for name in ("sharded", "plain", "cut")}
    for part in ("trained", "ema"):
        plain, sharded, cut = (weights[n] if part == "trained" else weights[n]["ema"] for n in ("plain", "sharded",
                                                                                                  "cut"))
        for player in ("encoder", "decoder"):
            for key, value in plain[player].items():
                assert torch.allclose(sharded[player][key], value, rtol=1e-4, atol=1e-6), f"{part} {player}.{key}"
                assert torch.equal(cut[player][key], sharded[player][key]), f"{part} {player}.{key}"
