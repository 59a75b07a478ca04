"""The game proven exact on an enumerable model: the `bilinear` family on x in {0,1}^6, z in {0,1}^dz, where
every expectation is a finite sum (`symeq_dist.eval.exact`). The real game losses and the real trainer (DeepSpeed
engines on CPU) are compared with exact gradients, exact best responses and the exact equilibrium.

pi(x) is a seeded mixture of 4 product distributions (it does not factorise), stored as 2048 shard samples that
hold state k exactly counts[k] times: with train.batch_size = 2048 every step's data batch is one epoch, i.e.
exactly pi(x), and the only randomness left is the game's own sampling (z ~ q on data, z ~ pi(z), x ~ p dreamed).
Tolerances and the noise they are sized to are in docs/consistency.md ("Exact check on enumerable models").
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from symeq_dist.api import train as run_training
from symeq_dist.config import GameConfig, PriorConfig, load_config, model_config
from symeq_dist.datasets.packed import write_shards
from symeq_dist.eval import exact
from symeq_dist.eval.exact import Params, Space
from symeq_dist.game import Round, build_game
from symeq_dist.models import build_players
from symeq_dist.priors import build_prior
from symeq_dist.runtime import checkpoint
from tests.conftest import ROOT

DX, TOTAL = 6, 2048
COUNTS = exact.mixture_counts(DX, TOTAL, components=4, seed=1)  # (64,) int64, all >= 1
LR = 0.03  # Adam lr of every trained player (trainer and exact dynamics alike)
Z_MAX = 4.5  # unbiasedness: |mean - exact| / SE over 45 coordinates; P(any |N(0,1)| > 4.5) < 45 * 6.8e-6 = 3e-4
# max-TV of the trained conditionals to the exact target. At batch 2048 and lr 0.03 the stationary noise of the
# trained conditionals is sigma ~ 0.026 at most (max-TV between checkpoints 100 steps apart, 0.018-0.037, over
# sqrt 2); 0.08 is ~3 sigma. The mutations of docs/consistency.md land at 0.25-0.94, the starting points at 0.47-0.78.
TOL_BEST_RESPONSE = 0.08
TOL_EQUILIBRIUM = 0.08


def space(dz: int) -> Space:
    return Space(pi_x=COUNTS.double() / TOTAL, dz=dz)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is several times faster than two on a shared machine (and deterministic)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pi_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pi(x) as shards: state k written COUNTS[k] times in a seeded random order; uint8 0/1 images (1, 1, DX)."""
    states = torch.repeat_interleave(torch.arange(2 ** DX), COUNTS)
    order = torch.randperm(TOTAL, generator=torch.Generator().manual_seed(1))
    images = exact.all_bits(DX)[states[order]].to(torch.uint8).numpy().reshape(TOTAL, 1, 1, DX)
    labels = np.zeros(TOTAL, dtype=np.int64)
    out = tmp_path_factory.mktemp("exact") / "shards"
    write_shards(out, {"train": (images, labels), "valid": (images[:64], labels[:64])}, dataset="bilinear",
                 samples_per_shard=TOTAL, meta={"source": "tests/test_exact.py: exact.mixture_counts(6, 2048, 4, 1)"})
    return out


def train_run(run_dir: Path, shards: Path, *, steps: int, dz: int, init_scale: float, lr_decoder: float,
              lr_encoder: float) -> tuple[Params, Params, dict[str, float]]:
    """A real `api.train` run on the pi shards. Returns the pair's initial and final parameters, and the noise
    spread: max-TV of the conditionals between the last two checkpoints (100 steps apart)."""
    cfg = load_config(None, [
        f"run_dir={run_dir}", f"data.shards={shards}", "data.num_workers=0", "data.binarize_threshold=1",
        "data.noise=none", "model.kind=bilinear", f"model.image_shape=[1,1,{DX}]", f"model.num_latents={dz}",
        f"model.init_scale={init_scale}", f"train.batch_size={TOTAL}", f"train.steps={steps}",
        f"engines.decoder.lr={lr_decoder}", f"engines.encoder.lr={lr_encoder}",
        f"engines.ds_config={ROOT / 'ds_config.json'}",
        f"monitor.log_every={steps}", f"monitor.image_every={steps}", "monitor.progress=false", "monitor.num_grid=4",
        "checkpoint.every=100", "checkpoint.keep_last=2", "sampling.num_chains=4"])
    torch.manual_seed(cfg.seed)  # the trainer's own initialisation (api.build_trainer)
    init = Params.of_players(*build_players(cfg.model))
    run_training(cfg)
    steps_dirs = sorted((run_dir / "checkpoints").glob("step_*"))
    final, before = (Params.of_state_dicts(checkpoint.read_weights(d)) for d in (steps_dirs[-1], steps_dirs[-2]))
    return init, final, exact.conditional_tv(space(dz), final, before)


# ---------------------------------------------------------------- the exact module against the family's own code

def test_exact_formulas_are_the_family_and_pi_does_not_factorise() -> None:
    sp = space(3)
    torch.manual_seed(0)
    encoder, decoder = build_players(model_config(kind="bilinear", image_shape=(1, 1, DX), num_latents=3))
    prm = Params.of_players(encoder, decoder)
    xs, zs = sp.xs.float().reshape(-1, 1, 1, DX), sp.zs.float()
    with torch.no_grad():  # every (z, x): the modules' own log-likelihoods against the enumerated formulas
        own_p = torch.stack([decoder.x_dist({"z": z.expand(len(xs), -1)}).log_prob(xs) for z in zs])
        own_q = torch.stack([encoder.conditionals(x.expand(len(zs), -1, -1, -1), {}, decoder)["z"].log_prob(zs)
                             for x in xs])
    torch.testing.assert_close(own_p.double(), exact.log_p(sp, prm), atol=1e-5, rtol=0)
    torch.testing.assert_close(own_q.double(), exact.log_q(sp, prm), atol=1e-5, rtol=0)
    assert torch.equal(exact.state_index(sp.xs), torch.arange(2 ** DX))
    marginals = sp.pi_x @ sp.xs
    product = torch.exp(sp.xs @ marginals.log() + (1 - sp.xs) @ (1 - marginals).log())
    assert exact.kl(sp.pi_x, product) > 0.05  # pi(x) is far from the product of its marginals
    entropy = -float((sp.pi_x * sp.pi_x.log()).sum())
    assert exact.joint_kl(sp, prm) == pytest.approx(-entropy - float(exact.elbo(sp, prm)), abs=1e-10)
    kernel = exact.transition(sp, prm)
    chain = exact.stationary(kernel)
    torch.testing.assert_close(chain @ kernel, chain, atol=1e-12, rtol=0)
    # METHOD §5: the ELBO's decoder gradient is L_p's
    elbo_grads, game_grads = exact.elbo_gradients(sp, prm), exact.gradients(sp, prm)
    torch.testing.assert_close(elbo_grads.W, game_grads.W, atol=1e-12, rtol=0)
    torch.testing.assert_close(elbo_grads.b, game_grads.b, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- unbiased per-step gradients

def test_game_gradients_are_unbiased() -> None:
    """The mean of our stochastic per-step gradients equals the exact dL_p/dtheta and dL_q/dphi within Z_MAX
    standard errors per coordinate. The losses are the trainer's: `build_game` (symmetric) on a `Round`, the
    decoder's (complete_data + decoder_loss) then the encoder's (dream + encoder_loss), backpropagated together
    into both modules, so a gradient that crosses players (a missing detach) shows up in the other's mean."""
    sp, num_draws, batch = space(3), 1000, 512
    torch.manual_seed(0)
    players = build_players(model_config(kind="bilinear", image_shape=(1, 1, DX), num_latents=3))
    the_game = build_game(GameConfig(), players, build_prior(PriorConfig(), players.decoder))
    enc, dec = players.encoder.linear, players.decoder.linear
    params = [dec.weight, dec.bias, enc.weight, enc.bias]
    gens = {"wake": torch.Generator().manual_seed(1), "dream": torch.Generator().manual_seed(2)}
    data_gen, xs = torch.Generator().manual_seed(3), sp.xs.float()
    draws = []
    for _ in range(num_draws):
        x = xs[torch.multinomial(sp.pi_x, batch, replacement=True, generator=data_gen)].reshape(batch, 1, 1, DX)
        rnd = Round(x=x, num_dreams=batch, gens=gens)
        loss = sum(the_game.losses[name](rnd).loss for name in ("decoder", "encoder"))
        for p in params:
            p.grad = None
        loss.backward()
        draws.append(torch.cat([-p.grad.reshape(-1) for p in params]).double())  # ascent direction of L
    sample = torch.stack(draws)  # (num_draws, 45)
    mean, se = sample.mean(0), sample.std(0) / num_draws ** 0.5
    want = exact.gradients(sp, Params.of_players(players.encoder, players.decoder)).flat()
    z = (mean - want) / se
    n_dec = DX * 3 + DX
    assert float(z.abs().max()) < Z_MAX, (f"max |z| {float(z.abs().max()):.1f} at coordinate {int(z.abs().argmax())} "
                                          f"(decoder: < {n_dec}); z = {z.numpy().round(1).tolist()}")
    # power: each player's exact gradient is far outside the noise, so a gradient that averages to zero (a player
    # fitting its own samples) or to something else cannot pass
    assert float((want[:n_dec].abs() / se[:n_dec]).max()) > 20 and float((want[n_dec:].abs() / se[n_dec:]).max()) > 20


# ---------------------------------------------------------------- best responses and the full game, real trainer

@pytest.mark.parametrize("player", ["decoder", "encoder"])
def test_trainer_reaches_the_exact_best_response(player: str, pi_shards: Path, tmp_path: Path) -> None:
    """The other player frozen (engines.<other>.lr=0: bitwise unchanged), 400 steps of the real trainer reach the
    exact maximiser over the family of this player's utility (LBFGS on the enumerated sum)."""
    sp = space(3)
    lrs = {"lr_decoder": LR if player == "decoder" else 0.0, "lr_encoder": LR if player == "encoder" else 0.0}
    init, final, spread = train_run(tmp_path / "run", pi_shards, steps=400, dz=3, init_scale=1.0, **lrs)
    frozen = exact.ENCODER if player == "decoder" else exact.DECODER
    assert all(torch.equal(getattr(final, n), getattr(init, n)) for n in frozen), "lr 0 must freeze the player"
    target = exact.best_response(sp, init, player)
    grads = exact.gradients(sp, target)
    own = exact.DECODER if player == "decoder" else exact.ENCODER
    assert max(float(getattr(grads, n).abs().max()) for n in own) < 1e-8  # the exact maximiser (concave utility)
    start, end = (exact.conditional_tv(sp, p, target)[player] for p in (init, final))
    assert end < TOL_BEST_RESPONSE, (f"{player}: max-TV to the exact best response {end:.3f} (from {start:.3f}); "
                                     f"spread between the last two checkpoints {spread}")
    assert start > 0.3  # the best response is far from the initial conditional: the run had work to do


def test_trainer_reaches_the_exact_equilibrium(pi_shards: Path, tmp_path: Path) -> None:
    """Both players trained (alternating, Adam lr LR): the trainer's end point is the fixed point of the same
    dynamics with exact gradients from the same initialisation (polished by Newton's method), up to the game's
    relabelling symmetry z -> 1 - z; that point is a Nash equilibrium (exact gradients 0, each player its own
    best response) and attracts (every eigenvalue of the field's Jacobian has a negative real part).

    One latent bit: with dz = 3 the equilibria of this pi have coupled directions with eigenvalues ~1e-4 that no
    short run resolves (docs/consistency.md)."""
    sp, steps = space(1), 800
    init, final, spread = train_run(tmp_path / "run", pi_shards, steps=steps, dz=1, init_scale=0.5, lr_decoder=LR,
                            lr_encoder=LR)
    path = exact.adam_dynamics(sp, init, steps=steps, lr=LR)  # the trainer's update rule, exact gradients
    fixed = exact.solve_equilibrium(sp, path)
    assert max(exact.conditional_tv(sp, path, fixed).values()) < 1e-3  # the exact dynamics have converged
    grads = exact.gradients(sp, fixed)
    assert float(grads.flat().abs().max()) < 1e-9
    for player in ("decoder", "encoder"):
        assert exact.conditional_tv(sp, exact.best_response(sp, fixed, player), fixed)[player] < 1e-6
    assert float(torch.linalg.eigvals(exact.field_jacobian(sp, fixed)).real.max()) < 0
    aligned, dist = exact.align(sp, fixed, final)
    assert max(dist.values()) < TOL_EQUILIBRIUM, (f"max-TV to the exact equilibrium {dist}; spread between the "
                                                  f"last two checkpoints {spread}")
    start = exact.align(sp, fixed, init)[1]
    assert min(start.values()) > 0.3
    assert exact.joint_kl(sp, aligned) == pytest.approx(exact.joint_kl(sp, fixed), abs=5e-3)
    # one latent bit: the decoder's posterior p(z|x) has log-odds linear in x, so it lies in the encoder family;
    # the encoder's best response is that posterior, the decoder's is then the EM step, and the equilibrium is a
    # stationary point of the ELBO (docs/consistency.md)
    assert exact.report(sp, fixed)["posterior_gap"] < 1e-12
    assert float(exact.elbo_gradients(sp, fixed).flat().abs().max()) < 1e-9


def test_likelihood_bounds_are_the_exact_ones() -> None:
    """eval/likelihood.py on the enumerable pair: the mean log weight is the exact ELBO of each x and the
    importance-weighted bound with K = 4000 is the exact log p(x), each within 4.5 standard errors (for the
    bound by the delta method: sd(w) / (mean(w) sqrt(K)) for the weights w = p(x, z) / q(z|x))."""
    import math

    from symeq_dist.eval.likelihood import bits_per_dim, log_weights

    sp = space(3)
    cfg = model_config("bilinear", num_latents=3)
    torch.manual_seed(0)
    enc, dec = build_players(cfg)
    prm = Params.of_players(enc, dec)
    prior = build_prior(PriorConfig(), dec)
    log_joint = exact.log_p(sp, prm).T + sp.pi_z.log()  # (Nx, Nz): log pi(z) + log p(x|z)
    log_px = torch.logsumexp(log_joint, dim=1)
    lq = exact.log_q(sp, prm)  # (Nx, Nz)
    exact_elbo = (lq.exp() * (log_joint - lq)).sum(dim=1)
    states = torch.tensor([0, 21, 42, 63])
    x = sp.xs[states].float().reshape(-1, 1, 1, sp.dx)
    weights, discrete = log_weights(enc, dec, prior, x, 4000, torch.Generator().manual_seed(1))
    se = weights.std(dim=0) / math.sqrt(weights.shape[0])
    assert discrete and torch.all((weights.mean(dim=0) - exact_elbo[states]).abs() < 4.5 * se)
    iw = torch.logsumexp(weights, dim=0) - math.log(weights.shape[0])
    ratio = (weights - weights.max(dim=0).values).exp()  # w up to a per-x constant: the sd/mean ratio is the same
    se_iw = ratio.std(dim=0) / ratio.mean(dim=0) / math.sqrt(weights.shape[0])
    assert torch.all((iw - log_px[states]).abs() < 4.5 * se_iw) and torch.all(se_iw < 0.1)  # a lost log pi(z) is 2.1
    report = bits_per_dim(enc, dec, prior, [x], num_samples=8, generator=torch.Generator().manual_seed(2))
    assert report["iw_bpd"] <= report["elbo_bpd"] and report["num_images"] == 4
