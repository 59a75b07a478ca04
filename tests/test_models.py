"""Tests of symeq_dist.models: distributions, reference parameter counts, player ops and gradient isolation."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.distributions as td
from torch import Tensor, nn

from symeq_dist.config import ConfigError, ModelConfig, model_config
from symeq_dist.models import (
    Bernoulli,
    Categorical,
    Decoder,
    Distribution,
    Encoder,
    Gaussian,
    build_players,
    layers,
)
from symeq_dist.models.distributions import HALF_LOG_2PI
from symeq_dist.models.families.ladder28 import LadderEncoder
from symeq_dist.models.families.mlp_vae import MLPDecoder, MLPEncoder
from symeq_dist.models.families.ref28 import Reference28Decoder as HierarchicalDecoder
from symeq_dist.models.families.reverse28 import ReverseEncoder
from symeq_dist.models.layers import set_x_offset

B = 4


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- parameter counts (METHOD §10)

@pytest.mark.parametrize(("overrides", "n_encoder", "n_decoder"), [
    ({"kind": "ladder"}, 2_202_386, 817_757),
    ({"kind": "reverse"}, 2_262_986, 817_757),
    ({"kind": "ladder", "x_dist": "gaussian", "num_z0": 50, "num_z1": 200, "trunk_width": 1000},
     4_481_906, 1_101_658),
    ({"kind": "ladder", "x_dist": "gaussian", "trunk_width": 1000}, 4_354_786, 817_758),
])
def test_reference_parameter_counts(overrides: dict, n_encoder: int, n_decoder: int) -> None:
    encoder, decoder = build_players(model_config(**overrides))
    assert num_params(encoder) == n_encoder
    assert num_params(decoder) == n_decoder


def test_reference_parameter_count_parts() -> None:
    ladder, decoder = build_players(model_config(kind="ladder"))
    reverse, _ = build_players(model_config(kind="reverse"))
    assert isinstance(ladder, LadderEncoder) and isinstance(decoder, HierarchicalDecoder)
    assert num_params(ladder.trunk) == 1_400_056
    assert num_params(decoder.prior_net) == 442_300
    assert num_params(decoder.image_net) == 375_457
    assert isinstance(reverse, ReverseEncoder)
    assert (num_params(reverse.z1_net), num_params(reverse.z0_net)) == (1_460_156, 802_830)


@pytest.mark.parametrize("kind", ["ladder", "reverse"])
def test_init_gain_scales_weights_not_biases(kind: str) -> None:
    torch.manual_seed(0)
    base = build_players(model_config(kind=kind, num_z0=4, num_z1=8, trunk_width=16, mlp_width=16))
    torch.manual_seed(0)
    scaled = build_players(model_config(kind=kind, num_z0=4, num_z1=8, trunk_width=16, mlp_width=16, init_gain=3.0))
    for (_, a), (_, b) in zip(base.items(), scaled.items(), strict=True):
        for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            assert torch.allclose(q, p * (3.0 if p.dim() >= 2 else 1.0)), name


def test_x_offset_makes_a_z_blind_decoder_the_pixel_marginal() -> None:
    """model.x_offset=data_marginal: with every image-net weight at 0, p(x|z) is the given marginal for any z."""
    cfg = model_config(kind="ladder", num_z0=4, num_z1=8, trunk_width=16, mlp_width=16, x_offset="data_marginal")
    _, decoder = build_players(cfg)
    marginal = torch.rand(1, 28, 28) * 0.98 + 0.01
    set_x_offset(decoder, marginal)
    with torch.no_grad():
        for p in decoder.image_net.parameters():
            p.zero_()
    z = {"z0": torch.ones(2, 4), "z1": torch.bernoulli(torch.full((2, 8), 0.5))}
    probs = torch.sigmoid(decoder.x_dist(z).logits)
    assert torch.allclose(probs, marginal.expand(2, 1, 28, 28), atol=1e-6)
    assert "x_head.offset" in decoder.state_dict()  # checkpointed with the weights
    _, plain = build_players(model_config(kind="ladder", num_z0=4, num_z1=8, trunk_width=16, mlp_width=16))
    assert not any("offset" in k for k in plain.state_dict())  # off by default: state dicts unchanged
    with pytest.raises(ConfigError, match=r"model\.init_gain: must be > 0"):
        model_config(kind="ladder", init_gain=0.0)
    with pytest.raises(ValueError, match=r"model\.x_offset=data_marginal"):
        set_x_offset(plain, marginal)
    with pytest.raises(ValueError, match=r"marginal of shape \(28, 28\)"):
        set_x_offset(decoder, marginal[0])


def test_g_theta_owned_by_decoder_only() -> None:
    encoder, decoder = build_players(model_config(kind="ladder"))
    enc_ids = {id(p) for p in encoder.parameters()}
    assert not enc_ids & {id(p) for p in decoder.parameters()}
    assert not any(isinstance(m, HierarchicalDecoder) for m in encoder.modules())


def test_mlp_players_and_sigma_options() -> None:
    encoder, decoder = build_players(model_config(kind="mlp", num_latents=8, hidden=32))
    assert isinstance(encoder, MLPEncoder) and isinstance(decoder, MLPDecoder)
    assert encoder.analytic_kl and decoder.top_family == "gaussian" and decoder.latent_names == ("z",)
    assert num_params(encoder) == (784 * 32 + 32) + (32 * 32 + 32) + (32 * 16 + 16)
    base = (8 * 32 + 32) + (32 * 32 + 32) + (32 * 784 + 784)
    assert num_params(decoder) == base
    _, dec_global = build_players(model_config(kind="mlp", num_latents=8, hidden=32, x_dist="gaussian"))
    _, dec_per_dim = build_players(model_config(kind="mlp", num_latents=8, hidden=32, x_dist="gaussian",
                                               sigma="per_dim"))
    assert num_params(dec_global) == base + 1 and num_params(dec_per_dim) == base + 784


# ---------------------------------------------------------------- distributions: log_prob

def test_bernoulli_log_prob_matches_torch() -> None:
    logits = torch.randn(5, 3, 4, generator=gen())
    value = torch.bernoulli(torch.full((5, 3, 4), 0.5), generator=gen(1))
    ref = td.Bernoulli(logits=logits).log_prob(value).sum(dim=(1, 2))
    torch.testing.assert_close(Bernoulli(logits).log_prob(value), ref)


@pytest.mark.parametrize("sigma_shape", [(), (3, 4), (5, 3, 4)])
def test_gaussian_log_prob_matches_torch(sigma_shape: tuple[int, ...]) -> None:
    mu, x = torch.randn(5, 3, 4, generator=gen()), torch.randn(5, 3, 4, generator=gen(1))
    log_sigma = 0.3 * torch.randn(sigma_shape, generator=gen(2))
    got = Gaussian(mu, log_sigma).log_prob(x)
    assert got.shape == (5,)
    ref = td.Normal(mu, log_sigma.exp().expand_as(mu)).log_prob(x).sum(dim=(1, 2))
    # the reference constant 0.91894 differs from ½ log 2π by 1.5e-6 per element
    torch.testing.assert_close(got, ref, atol=12 * 2e-6, rtol=1e-5)
    exact = -(HALF_LOG_2PI + log_sigma + (x - mu) ** 2 / (2 * (2 * log_sigma).exp())).sum(dim=(1, 2))
    torch.testing.assert_close(got, exact)


@pytest.mark.parametrize("dim", [1, 3, -1])
def test_categorical_log_prob_matches_torch(dim: int) -> None:
    logits = torch.randn(5, 6, 2, 3, generator=gen())
    moved = logits.movedim(dim, -1)  # (B, ..., K) for torch.distributions
    value = torch.randint(0, moved.shape[-1], moved.shape[:-1], generator=gen(1))
    ref = td.Categorical(logits=moved).log_prob(value).sum(dim=(1, 2))
    torch.testing.assert_close(Categorical(logits, dim=dim).log_prob(value), ref)


def test_log_prob_is_float32() -> None:
    logits = torch.randn(2, 7, dtype=torch.bfloat16)
    value = torch.ones(2, 7, dtype=torch.bfloat16)
    assert Bernoulli(logits).log_prob(value).dtype == torch.float32
    assert Gaussian(logits, torch.zeros((), dtype=torch.bfloat16)).log_prob(value).dtype == torch.float32


# ---------------------------------------------------------------- distributions: sampling

def test_samples_values_detached_and_reproducible() -> None:
    logits = torch.randn(6, 10, requires_grad=True)
    bits = Bernoulli(logits).sample(gen(3))
    assert bits.shape == (6, 10) and not bits.requires_grad
    assert set(bits.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(bits, Bernoulli(logits).sample(gen(3)))
    normal = Gaussian(logits, torch.zeros(()))
    assert not normal.sample(gen(3)).requires_grad
    assert torch.equal(normal.sample(gen(3)), normal.sample(gen(3)))
    assert not torch.equal(normal.sample(gen(3)), normal.sample(gen(4)))
    classes = Categorical(logits.view(6, 5, 2), dim=1).sample(gen(3))
    assert classes.shape == (6, 2) and classes.dtype == torch.long and int(classes.max()) < 5
    assert torch.equal(classes, Categorical(logits.view(6, 5, 2), dim=1).sample(gen(3)))


def test_modes_and_means() -> None:
    logits = torch.tensor([[-2.0, 0.5, 3.0]])
    assert torch.equal(Bernoulli(logits).mode(), torch.tensor([[0.0, 1.0, 1.0]]))
    torch.testing.assert_close(Bernoulli(logits).mean(), torch.sigmoid(logits))
    assert torch.equal(Gaussian(logits, torch.zeros(())).mode(), logits)
    cat = Categorical(logits, dim=1)
    assert cat.mode().tolist() == [2] and cat.mean().shape == (1, 3)


def test_zgr_forward_is_hard_sample_and_gradient_is_j() -> None:
    logits = torch.randn(8, 16, generator=gen(), requires_grad=True)
    out = Bernoulli(logits).rsample(gen(5))
    hard = Bernoulli(logits).sample(gen(5))
    assert torch.equal(out.detach(), hard)
    out.sum().backward()
    p = torch.sigmoid(logits.detach())
    jacobian = (hard * (1 - p) + (1 - hard) * p) / 2
    torch.testing.assert_close(logits.grad, jacobian)


def test_gaussian_rsample_is_reparametrised() -> None:
    mu = torch.zeros(3, 4, requires_grad=True)
    log_sigma = torch.zeros((), requires_grad=True)
    z = Gaussian(mu, log_sigma).rsample(gen())
    z.sum().backward()
    torch.testing.assert_close(mu.grad, torch.ones(3, 4))
    torch.testing.assert_close(log_sigma.grad, z.detach().sum())


def test_categorical_rsample_raises() -> None:
    with pytest.raises(NotImplementedError, match="Categorical"):
        Categorical(torch.zeros(2, 3)).rsample()


# ---------------------------------------------------------------- distributions: KL

def _mc_kl(make_q: Callable[[int], Distribution], make_p: Callable[[int], Distribution], n: int = 40_000) -> Tensor:
    """Monte-Carlo KL(q || p) from n samples; the factories build (n,)-batched distributions."""
    q = make_q(n)
    value = q.sample(gen(7))
    return (q.log_prob(value) - make_p(n).log_prob(value)).mean()


def test_bernoulli_kl_matches_monte_carlo() -> None:
    lq, lp = torch.tensor([1.5, -0.3, 0.0, 2.0]), torch.tensor([0.0, 1.0, -2.0, 2.5])
    analytic = Bernoulli(lq[None]).kl(Bernoulli(lp[None]))
    mc = _mc_kl(lambda n: Bernoulli(lq.expand(n, 4)), lambda n: Bernoulli(lp.expand(n, 4)))
    assert analytic.shape == (1,)
    torch.testing.assert_close(analytic[0], mc, atol=0.03, rtol=0.05)


def test_gaussian_kl_matches_monte_carlo_and_closed_form() -> None:
    mq, sq = torch.tensor([0.5, -1.0, 0.0]), torch.tensor([0.2, -0.5, 0.1])
    mp, sp = torch.tensor([0.0, 0.3, 1.0]), torch.tensor([0.0, 0.2, -0.3])
    analytic = Gaussian(mq[None], sq[None]).kl(Gaussian(mp[None], sp[None]))
    mc = _mc_kl(lambda n: Gaussian(mq.expand(n, 3), sq), lambda n: Gaussian(mp.expand(n, 3), sp))
    torch.testing.assert_close(analytic[0], mc, atol=0.05, rtol=0.05)
    to_std = Gaussian(mq[None], sq[None]).kl(Gaussian(torch.zeros(1, 3), torch.zeros(())))
    closed = 0.5 * (mq**2 + (2 * sq).exp() - 1 - 2 * sq).sum()
    torch.testing.assert_close(to_std[0], closed)


def test_categorical_kl_matches_monte_carlo() -> None:
    lq, lp = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 0.5, 0.5]])
    analytic = Categorical(lq).kl(Categorical(lp))
    mc = _mc_kl(lambda n: Categorical(lq.expand(n, 3)), lambda n: Categorical(lp.expand(n, 3)))
    torch.testing.assert_close(analytic[0], mc, atol=0.03, rtol=0.05)


def test_bernoulli_kl_clamps_probabilities() -> None:
    kl = Bernoulli(torch.full((1, 2), 100.0)).kl(Bernoulli(torch.full((1, 2), -100.0)))
    a, c = 1 - 0.5e-6, 0.5e-6  # sigmoid(±100) rounded to 1/0, then a(1 - 1e-6) + 0.5e-6
    per_bit = a * math.log(a / c) + (1 - a) * math.log((1 - a) / (1 - c))
    assert torch.isfinite(kl).all()
    torch.testing.assert_close(kl, torch.tensor([2 * per_bit]), rtol=1e-4, atol=0.0)


def test_kl_rejects_other_family() -> None:
    with pytest.raises(TypeError, match="same family"):
        Bernoulli(torch.zeros(1, 2)).kl(Gaussian(torch.zeros(1, 2), torch.zeros(())))


# ---------------------------------------------------------------- distributions: mutual information

def test_bernoulli_mutual_information() -> None:
    same = Bernoulli(torch.randn(1, 3, 5).expand(8, 3, 5))
    mi = same.mutual_information()
    assert mi.shape == (15,)
    torch.testing.assert_close(mi, torch.zeros(15), atol=1e-6, rtol=0)
    split = Bernoulli(torch.cat([torch.full((4, 6), 50.0), torch.full((4, 6), -50.0)]))
    torch.testing.assert_close(split.mutual_information(), torch.full((6,), math.log(2)), atol=1e-4, rtol=0)


def test_categorical_mutual_information() -> None:
    same = Categorical(torch.randn(1, 4, 2).expand(6, 4, 2), dim=1)
    torch.testing.assert_close(same.mutual_information(), torch.zeros(2), atol=1e-6, rtol=0)
    one_hot = 100.0 * torch.eye(4)  # four rows, each certain of a different class
    torch.testing.assert_close(Categorical(one_hot).mutual_information(), torch.tensor([math.log(4)]),
                               atol=1e-4, rtol=0)


def test_gaussian_mutual_information() -> None:
    same = Gaussian(torch.randn(1, 3).expand(5, 3), torch.zeros(()))
    torch.testing.assert_close(same.mutual_information(), torch.zeros(3), atol=1e-6, rtol=0)
    mu = torch.tensor([[1.0, 0.0], [-1.0, 0.5]])  # Var_b = 1 and 1/16, sigma = 1
    mi = Gaussian(mu, torch.zeros(2, 2, requires_grad=True)).mutual_information()
    torch.testing.assert_close(mi, 0.5 * torch.log1p(torch.tensor([1.0, 1 / 16])))
    assert (mi > 0).all() and not mi.requires_grad


# ---------------------------------------------------------------- player ops

ARCHITECTURES = {
    "mlp_gaussian": model_config(kind="mlp", num_latents=8, hidden=32),
    "mlp_bernoulli_gaussx": model_config(kind="mlp", latent="bernoulli", num_latents=8, hidden=32,
                                        x_dist="gaussian", sigma="per_dim"),
    "ladder": model_config(kind="ladder"),
    "ladder_gaussx": model_config(kind="ladder", x_dist="gaussian", trunk_width=64, mlp_width=64),
    "reverse": model_config(kind="reverse"),
    "bilinear": model_config(kind="bilinear", image_shape=(1, 1, 6), num_latents=3),
}


def _top(decoder: Decoder, n: int = B) -> Tensor:
    shape = (n, *decoder.latent_shapes[decoder.latent_names[0]])
    if decoder.top_family == "bernoulli":
        return torch.bernoulli(torch.full(shape, 0.5), generator=gen(11))
    return torch.randn(shape, generator=gen(11))


def _data(cfg: ModelConfig) -> Tensor:
    return torch.bernoulli(torch.full((B, *cfg.image_shape), 0.3), generator=gen(12))


@pytest.fixture(params=sorted(ARCHITECTURES))
def players(request: pytest.FixtureRequest) -> tuple[ModelConfig, Encoder, Decoder]:
    torch.manual_seed(0)
    cfg = ARCHITECTURES[request.param]
    return (cfg, *build_players(cfg))


def test_decoder_ops_shapes(players: tuple[ModelConfig, Encoder, Decoder]) -> None:
    cfg, _, decoder = players
    with torch.no_grad():
        z, x, dists = decoder.sample(_top(decoder), gen(1))
    assert tuple(z) == decoder.latent_names and x.shape == (B, *cfg.image_shape)
    assert all(z[k].shape == (B, *decoder.latent_shapes[k]) for k in z)
    assert set(dists) == set(decoder.latent_names[1:]) | {"x"}
    if cfg.x_dist == "bernoulli":
        assert set(x.unique().tolist()) <= {0.0, 1.0}
    else:  # a resample, never the mean
        assert not torch.allclose(x, dists["x"].mean())
    cond = decoder.conditionals(z)
    assert set(cond) == set(dists)
    assert all(cond[k].log_prob(z[k] if k != "x" else x).shape == (B,) for k in cond)
    assert decoder.x_dist(z).mean().shape == (B, *cfg.image_shape)


def test_sampling_reproducible_with_generator(players: tuple[ModelConfig, Encoder, Decoder]) -> None:
    _, encoder, decoder = players
    with torch.no_grad():
        runs = [decoder.sample(_top(decoder), gen(2)) for _ in range(2)]
        codes = [encoder.sample(runs[0][1], decoder, gen(3))[0] for _ in range(2)]
    assert torch.equal(runs[0][1], runs[1][1])
    assert all(torch.equal(codes[0][k], codes[1][k]) for k in decoder.latent_names)


def test_encoder_ops_shapes(players: tuple[ModelConfig, Encoder, Decoder]) -> None:
    cfg, encoder, decoder = players
    x = _data(cfg)
    with torch.no_grad():
        z, dists = encoder.sample(x, decoder, gen(1))
    assert set(z) == set(dists) == set(decoder.latent_names)
    assert all(z[k].shape == (B, *decoder.latent_shapes[k]) and not z[k].requires_grad for k in z)
    cond = encoder.conditionals(x, z, decoder)
    assert set(cond) == set(decoder.latent_names)
    assert all(cond[k].log_prob(z[k]).shape == (B,) for k in cond)
    assert all(d.mutual_information().shape == (math.prod(decoder.latent_shapes[k]),) for k, d in cond.items())


def test_encoder_conditionals_give_no_gradient_to_decoder(players: tuple[ModelConfig, Encoder, Decoder]) -> None:
    _, encoder, decoder = players
    with torch.no_grad():
        z, x, _ = decoder.sample(_top(decoder), gen(1))
    cond = encoder.conditionals(x, z, decoder)
    loss = -sum(cond[k].log_prob(z[k]) for k in cond).mean()
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in decoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


def test_decoder_conditionals_give_no_gradient_to_encoder(players: tuple[ModelConfig, Encoder, Decoder]) -> None:
    cfg, encoder, decoder = players
    x = _data(cfg)
    with torch.no_grad():
        z, _ = encoder.sample(x, decoder, gen(1))
    cond = decoder.conditionals(z)
    loss = -sum(cond[k].log_prob(x if k == "x" else z[k]) for k in cond).mean()
    loss.backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert all(p.grad is not None for p in decoder.parameters())


def test_ladder_reparam_sample_gives_gradient_to_g_theta() -> None:
    torch.manual_seed(0)
    encoder, decoder = build_players(ARCHITECTURES["ladder"])
    assert isinstance(decoder, HierarchicalDecoder)
    x = _data(ARCHITECTURES["ladder"])
    z, q = encoder.sample(x, decoder, gen(1), reparam=True)
    p = decoder.conditionals(z)
    elbo = p["x"].log_prob(x) - q["z1"].kl(p["z1"]) - q["z0"].kl(Bernoulli(torch.zeros_like(z["z0"])))
    (-elbo.mean()).backward()
    assert all(prm.grad is not None and prm.grad.abs().sum() > 0 for prm in decoder.prior_net.parameters())
    assert all(prm.grad is not None and prm.grad.abs().sum() > 0 for prm in encoder.parameters())


def test_ladder_plain_sample_detaches_g_theta() -> None:
    torch.manual_seed(0)
    encoder, decoder = build_players(ARCHITECTURES["ladder"])
    _, q = encoder.sample(_data(ARCHITECTURES["ladder"]), decoder, gen(1))
    q["z1"].logits.sum().backward()
    assert all(p.grad is None for p in decoder.parameters())


def test_top_down_needs_the_top_latent() -> None:
    _, decoder = build_players(ARCHITECTURES["mlp_gaussian"])
    with pytest.raises(ValueError, match="needs a value in z or a posterior"):
        decoder.top_down()


def test_every_public_op_goes_through_forward() -> None:
    encoder, decoder = build_players(model_config(kind="ladder", trunk_width=32, mlp_width=32))
    calls: list[tuple[str, str]] = []
    for name, module in (("encoder", encoder), ("decoder", decoder)):
        module.register_forward_pre_hook(lambda _m, args, name=name: calls.append((name, args[0])))
    x = _data(ARCHITECTURES["ladder"])
    with torch.no_grad():
        z, x_new, _ = decoder.sample(_top(decoder), gen(1))
        decoder.conditionals(z)
        decoder.x_dist(z)
        decoder.top_down(z)
        encoder.sample(x, decoder, gen(2))
        encoder.conditionals(x_new, z, decoder)
    # one decoder call per encoder pass: the top-down quantities of every layer come from one gathered forward
    assert calls == [("decoder", "sample"), ("decoder", "conditionals"), ("decoder", "x_dist"),
                     ("decoder", "top_down"), ("encoder", "sample"), ("decoder", "top_down"),
                     ("encoder", "conditionals"), ("decoder", "top_down")]


def test_unknown_op_raises() -> None:
    encoder, _ = build_players(ARCHITECTURES["mlp_gaussian"])
    with pytest.raises(ValueError, match="valid ops"):
        encoder("weights")


@pytest.mark.parametrize("name", ["mlp_gaussian", "mlp_bernoulli_gaussx", "reverse"])
def test_reparam_sample_is_differentiable(name: str) -> None:
    torch.manual_seed(0)
    encoder, decoder = build_players(ARCHITECTURES[name])
    z, _ = encoder.sample(_data(ARCHITECTURES[name]), decoder, gen(1), reparam=True)
    assert all(v.requires_grad for v in z.values())
    sum(v.sum() for v in z.values()).backward()
    assert all(p.grad is not None for p in encoder.parameters())
    with torch.no_grad():
        plain, _ = encoder.sample(_data(ARCHITECTURES[name]), decoder, gen(1))
    assert all(torch.equal(plain[k], z[k].detach()) for k in z)  # same draw, only the gradient path differs


@pytest.mark.parametrize("kwargs", [{"stride": 2}, {"stride": 1}, {"stride": 2, "padding": 1, "output_padding": 1},
                                    {"stride": 2, "bias": False}], ids=["s2", "s1", "s2-pad", "no-bias"])
def test_conv_transpose_with_bias_after_equals_torch(kwargs: dict) -> None:
    """layers.ConvTranspose2d (bias added after the op, for oneDNN's speed) = nn.ConvTranspose2d: values, gradients,
    output_size, state-dict keys."""
    torch.manual_seed(0)
    ref = nn.ConvTranspose2d(6, 4, 3, **kwargs)
    ours = layers.ConvTranspose2d(6, 4, 3, **kwargs)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    size = [2 * 5, 2 * 5] if kwargs.get("padding") else None
    y_ref, y = ref(x, output_size=size), ours(x, output_size=size)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    grads_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], g)
    grads = torch.autograd.grad(y, [x, *ours.parameters()], g)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b)
