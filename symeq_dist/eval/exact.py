"""Exact game quantities of the enumerable `bilinear` family: every expectation is a finite sum over all (x, z).

x in {0,1}^dx with a given pi(x) over the 2^dx states, z in {0,1}^dz with pi(z) uniform; the decoder is
p(x|z) = prod_i Bern(sigma(W z + b)_i), the encoder q(z|x) = prod_j Bern(sigma(V x + c)_j), W, b, V, c read
from the players' `linear` submodules (`models/families/bilinear.py`). Everything runs in float64:
the utilities L_p, L_q (METHOD §2) and their gradients by autograd through the enumerated sums, the ELBO
(§9), KL(pi(x) q(z|x) || pi(z) p(x|z)), the limiting chain's transition matrix (§8) and its stationary
law, best responses (LBFGS), and deterministic game dynamics (Adam, as the trainer steps; Newton's method
on the stationarity conditions). Used by tests/test_exact.py and experiments/exact_game.py. Pure torch;
must not import `train`.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_BITS = 16  # dx + dz: 2^16 enumerated pairs is still instant; beyond that use sampling
DECODER, ENCODER = ("W", "b"), ("V", "c")  # each player's parameters


def all_bits(n: int) -> Tensor:
    """(2^n, n) float64: row k holds the binary digits of k (column i = bit i, least significant first)."""
    k = torch.arange(2 ** n).unsqueeze(1)
    return ((k >> torch.arange(n)) & 1).to(torch.float64)


@functools.cache
def _bits_cached(n: int) -> Tensor:
    return all_bits(n)


def state_index(bits: Tensor) -> Tensor:
    """(B, n) 0/1 -> (B,) int64 index k of `all_bits` (inverse of it)."""
    return (bits.round().long() << torch.arange(bits.shape[1])).sum(dim=1)


@dataclass(frozen=True)
class Space:
    """The enumerated sample spaces: pi(x) over all 2^dx states (x = all_bits(dx)), dz uniform latent bits."""

    pi_x: Tensor  # (2^dx,) float64, positive, sums to 1
    dz: int

    def __post_init__(self) -> None:
        if self.dx + self.dz > MAX_BITS:
            raise ValueError(f"dx + dz = {self.dx + self.dz} > {MAX_BITS}: too many states to enumerate")
        if self.pi_x.dim() != 1 or self.pi_x.numel() != 2 ** self.dx:
            raise ValueError(f"pi_x must be a vector over the 2^dx states, got shape {tuple(self.pi_x.shape)}")
        if (self.pi_x <= 0).any() or abs(float(self.pi_x.sum()) - 1.0) > 1e-12:
            raise ValueError("pi_x must be positive and sum to 1 (full support keeps every log finite)")

    @property
    def dx(self) -> int:
        return int(self.pi_x.numel()).bit_length() - 1

    @property
    def xs(self) -> Tensor:
        return _bits_cached(self.dx)  # (Nx, dx)

    @property
    def zs(self) -> Tensor:
        return _bits_cached(self.dz)  # (Nz, dz)

    @property
    def pi_z(self) -> Tensor:
        return torch.full((2 ** self.dz,), 2.0 ** -self.dz, dtype=torch.float64)


def mixture_counts(dx: int, total: int, *, components: int = 4, seed: int = 0, low: float = 0.1) -> Tensor:
    """(2^dx,) int64 counts summing to `total`, each >= 1, of a seeded mixture of `components` product Bernoulli
    distributions (bit probabilities uniform in [low, 1 - low], weights Dirichlet(2)): a pi(x) that does not
    factorise. counts / total is exactly the law of a shard set holding state k counts[k] times."""
    rng = np.random.default_rng(seed)
    mu = rng.uniform(low, 1 - low, size=(components, dx))
    weights = rng.dirichlet(np.full(components, 2.0))
    xs = all_bits(dx).numpy()
    pi = (weights[:, None] * np.prod(np.where(xs[None] > 0, mu[:, None], 1 - mu[:, None]), axis=2)).sum(axis=0)
    counts = 1 + np.floor(pi * (total - 2 ** dx)).astype(np.int64)
    counts[np.argmax(counts)] += total - counts.sum()
    return torch.from_numpy(counts)


@dataclass(frozen=True)
class Params:
    """The pair: decoder W (dx, dz), b (dx,); encoder V (dz, dx), c (dz,). Any float dtype; may carry grad."""

    W: Tensor
    b: Tensor
    V: Tensor
    c: Tensor

    @classmethod
    def of_players(cls, encoder: nn.Module, decoder: nn.Module) -> Params:
        """Read from the players' `linear` submodules, as detached float64 copies."""
        dec, enc = decoder.linear, encoder.linear
        return cls(*(t.detach().double().clone() for t in (dec.weight, dec.bias, enc.weight, enc.bias)))

    @classmethod
    def of_state_dicts(cls, weights: dict[str, dict[str, Tensor]]) -> Params:
        """From `runtime.checkpoint.read_weights(step_dir)` (player -> state dict)."""
        dec, enc = weights["decoder"], weights["encoder"]
        return cls(*(t.double() for t in (dec["linear.weight"], dec["linear.bias"], enc["linear.weight"],
                                           enc["linear.bias"])))

    def load_into(self, encoder: nn.Module, decoder: nn.Module) -> None:
        """Write into the players' `linear` submodules (e.g. to sample from an exact equilibrium)."""
        with torch.no_grad():
            for module, (w, b) in ((decoder.linear, (self.W, self.b)), (encoder.linear, (self.V, self.c))):
                module.weight.copy_(w)
                module.bias.copy_(b)

    def flat(self) -> Tensor:
        return torch.cat([t.reshape(-1) for t in (self.W, self.b, self.V, self.c)])

    def like(self, flat: Tensor) -> Params:
        """The same shapes filled from a flat vector (as `flat` orders them)."""
        out, start = {}, 0
        for f in fields(self):
            shape = getattr(self, f.name).shape
            out[f.name] = flat[start:start + shape.numel()].reshape(shape)
            start += shape.numel()
        return Params(**out)

    def detached(self) -> Params:
        return Params(*(t.detach().double().clone() for t in (self.W, self.b, self.V, self.c)))


def collapsed(space: Space) -> Params:
    """W = V = 0 with the biases at their best responses: p(x|z) = prod_i Bern(pi_i), q(z|x) = Bern(1/2)^dz."""
    mean_x = (space.pi_x @ space.xs).clamp(1e-12, 1 - 1e-12)
    return Params(W=torch.zeros(space.dx, space.dz, dtype=torch.float64), b=torch.logit(mean_x),
                  V=torch.zeros(space.dz, space.dx, dtype=torch.float64), c=torch.zeros(space.dz, dtype=torch.float64))


# ---------------------------------------------------------------- conditionals and the quantities of the game

def _log_bern(bits: Tensor, logits: Tensor) -> Tensor:
    """log prod_i Bern(bits_i; sigma(logits_i)), bits (N, d), logits (M, d) -> (M, N)."""
    return logits @ bits.T - F.softplus(logits).sum(dim=1, keepdim=True)


def log_p(space: Space, prm: Params) -> Tensor:
    """(Nz, Nx): log p(x | z) = <x, W z + b> - sum_i softplus((W z + b)_i)."""
    return _log_bern(space.xs, space.zs @ prm.W.double().T + prm.b.double())


def log_q(space: Space, prm: Params) -> Tensor:
    """(Nx, Nz): log q(z | x) = <z, V x + c> - sum_j softplus((V x + c)_j)."""
    return _log_bern(space.zs, space.xs @ prm.V.double().T + prm.c.double())


def utilities(space: Space, prm: Params) -> tuple[Tensor, Tensor]:
    """(L_p, L_q), METHOD §2. Each player's utility sees the other's conditional as a constant (detached):
    L_p = sum_{x,z} pi(x) q(z|x) log p(x|z),  L_q = sum_{z,x} pi(z) p(x|z) log q(z|x)."""
    lp, lq = log_p(space, prm), log_q(space, prm)
    wake = space.pi_x[:, None] * lq.detach().exp()  # (Nx, Nz) pi(x) q(z|x)
    dream = space.pi_z[:, None] * lp.detach().exp()  # (Nz, Nx) pi(z) p(x|z)
    return (wake * lp.T).sum(), (dream * lq.T).sum()


def gradients(space: Space, prm: Params) -> Params:
    """The exact gradients dL_p/d(W, b) and dL_q/d(V, c) (ascent directions), as a Params of float64."""
    live = Params(*(t.detach().double().requires_grad_(True) for t in (prm.W, prm.b, prm.V, prm.c)))
    l_p, l_q = utilities(space, live)
    g_w, g_b = torch.autograd.grad(l_p, [live.W, live.b])
    g_v, g_c = torch.autograd.grad(l_q, [live.V, live.c])
    return Params(g_w, g_b, g_v, g_c)


def field(space: Space, flat: Tensor, template: Params) -> Tensor:
    """The game's gradient field (dL_p/dtheta, dL_q/dphi) at flat parameters, differentiable in `flat`."""
    prm = template.like(flat)
    lp, lq = log_p(space, prm), log_q(space, prm)
    # each player's gradient with the other's conditional held fixed, then differentiated again for Newton
    g_p = torch.autograd.grad((space.pi_x[:, None] * lq.exp() * lp.T).sum(), [flat], create_graph=True)[0]
    g_q = torch.autograd.grad((space.pi_z[:, None] * lp.exp() * lq.T).sum(), [flat], create_graph=True)[0]
    n_dec = prm.W.numel() + prm.b.numel()
    return torch.cat([g_p[:n_dec], g_q[n_dec:]])


def field_jacobian(space: Space, prm: Params) -> Tensor:
    """(P, P) Jacobian of `field`: its eigenvalues decide whether simultaneous gradient ascent is attracted."""
    flat = prm.detached().flat()
    return torch.autograd.functional.jacobian(lambda v: field(space, v, prm.detached()), flat)


def joint_kl(space: Space, prm: Params) -> float:
    """KL(pi(x) q(z|x) || pi(z) p(x|z)) in nats (= -H(pi_x) - ELBO: the ELBO optimum minimises it)."""
    lp, lq = log_p(space, prm).detach(), log_q(space, prm).detach()
    wake = space.pi_x[:, None] * lq.exp()
    log_ratio = space.pi_x.log()[:, None] + lq - space.pi_z.log()[None, :] - lp.T
    return float((wake * log_ratio).sum())


def elbo(space: Space, prm: Params) -> Tensor:
    """E_pi(x) [ E_q log p(x|z) - KL(q(z|x) || pi(z)) ], exact; differentiable in both players."""
    lp, lq = log_p(space, prm), log_q(space, prm)
    q = lq.exp()
    return (space.pi_x[:, None] * q * (lp.T + space.pi_z.log()[None, :] - lq)).sum()


def elbo_gradients(space: Space, prm: Params) -> Params:
    """The exact gradient of the ELBO w.r.t. all four parameters (one objective over both players)."""
    live = Params(*(t.detach().double().requires_grad_(True) for t in (prm.W, prm.b, prm.V, prm.c)))
    return Params(*torch.autograd.grad(elbo(space, live), [live.W, live.b, live.V, live.c]))


def transition(space: Space, prm: Params) -> Tensor:
    """(Nx, Nx) limiting-chain kernel T[x, x'] = sum_z q(z|x) p(x'|z) (METHOD §8)."""
    return log_q(space, prm).detach().exp() @ log_p(space, prm).detach().exp()


def stationary(kernel: Tensor) -> Tensor:
    """The stationary law s = s T of a positive stochastic matrix (unique): the solution of s (T - I) = 0,
    sum s = 1, by least squares."""
    n = kernel.shape[0]
    system = torch.cat([(kernel - torch.eye(n, dtype=kernel.dtype)).T, torch.ones(1, n, dtype=kernel.dtype)])
    rhs = torch.cat([torch.zeros(n, dtype=kernel.dtype), torch.ones(1, dtype=kernel.dtype)])
    return torch.linalg.lstsq(system, rhs.unsqueeze(1)).solution.squeeze(1).clamp_min(0.0)


def tv(a: Tensor, b: Tensor) -> Tensor:
    """Total variation 0.5 sum |a - b| along the last dimension."""
    return 0.5 * (a - b).abs().sum(dim=-1)


def kl(a: Tensor, b: Tensor) -> float:
    return float((a * (a.clamp_min(1e-300).log() - b.clamp_min(1e-300).log())).sum())


def report(space: Space, prm: Params) -> dict[str, float]:
    """The numbers of docs/consistency.md: utilities, ELBO, joint KL, gradient norms, the x-marginals of the
    limiting chain (stationary) and of random codes (p(x) = sum_z pi(z) p(x|z)) against pi(x), and the encoder's
    distance to the decoder's posterior E_pi(x) KL(q(z|x) || p(z|x)) = KL(joint) - KL(pi || p(x))."""
    l_p, l_q = utilities(space, prm)
    grads = gradients(space, prm)
    chain = stationary(transition(space, prm))
    p_x = space.pi_z @ log_p(space, prm).detach().exp()
    kl_joint = joint_kl(space, prm)
    return {"L_p": float(l_p), "L_q": float(l_q), "elbo": float(elbo(space, prm)), "joint_kl": kl_joint,
            "posterior_gap": kl_joint - kl(space.pi_x, p_x),  # E_pi(x) KL(q(z|x) || p(z|x)), by the chain rule
            "grad_decoder": float(torch.cat([grads.W.reshape(-1), grads.b]).norm()),
            "grad_encoder": float(torch.cat([grads.V.reshape(-1), grads.c]).norm()),
            "chain_tv": float(tv(chain, space.pi_x)), "chain_kl": kl(space.pi_x, chain),
            "random_code_tv": float(tv(p_x, space.pi_x)), "random_code_kl": kl(space.pi_x, p_x)}


def conditional_tv(space: Space, a: Params, b: Params) -> dict[str, float]:
    """How far two pairs' conditionals are: max_z TV(p_a(.|z), p_b(.|z)) and max_x TV(q_a(.|x), q_b(.|x))."""
    p_a, p_b = log_p(space, a).detach().exp(), log_p(space, b).detach().exp()
    q_a, q_b = log_q(space, a).detach().exp(), log_q(space, b).detach().exp()
    return {"decoder": float(tv(p_a, p_b).max()), "encoder": float(tv(q_a, q_b).max())}


def relabel(prm: Params, perm: tuple[int, ...], flips: tuple[int, ...]) -> Params:
    """The same pair with latent bit j renamed perm[j] and then bit j negated (z_j -> 1 - z_j) where flips[j]: with
    pi(z) uniform the game, its utilities and the chain are invariant under these 2^dz dz! relabellings."""
    W, b, V, c = prm.W[:, list(perm)].clone(), prm.b.clone(), prm.V[list(perm)].clone(), prm.c[list(perm)].clone()
    for j, flip in enumerate(flips):
        if flip:  # <x, W z + b> with z_j -> 1 - z_j: column j negated, b absorbs it; q's row j and c_j negated
            b = b + W[:, j]
            W[:, j], V[j], c[j] = -W[:, j], -V[j], -c[j]
    return Params(W, b, V, c)


def align(space: Space, reference: Params, prm: Params) -> tuple[Params, dict[str, float]]:
    """The relabelling of `prm` closest to `reference` (smallest max of `conditional_tv`) and that distance."""
    dz = space.dz
    best: tuple[Params, dict[str, float]] | None = None
    for perm in itertools.permutations(range(dz)):
        for flips in itertools.product((0, 1), repeat=dz):
            cand = relabel(prm, perm, flips)
            dist = conditional_tv(space, reference, cand)
            if best is None or max(dist.values()) < max(best[1].values()):
                best = (cand, dist)
    assert best is not None
    return best


# ---------------------------------------------------------------- deterministic solvers

def _lbfgs(loss_fn: object, tensors: list[Tensor], *, max_iter: int = 2000) -> None:
    opt = torch.optim.LBFGS(tensors, lr=1.0, max_iter=max_iter, tolerance_grad=1e-13, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = loss_fn()  # type: ignore[operator]
        loss.backward()
        return loss

    opt.step(closure)


def best_response(space: Space, prm: Params, player: str) -> Params:
    """The exact maximiser over the family of `player`'s utility with the other player fixed (LBFGS from the
    current value; each utility is a weighted logistic likelihood: strictly concave with full support)."""
    prm = prm.detached()
    names = DECODER if player == "decoder" else ENCODER
    live = {n: getattr(prm, n).clone().requires_grad_(True) for n in names}
    index = 0 if player == "decoder" else 1
    _lbfgs(lambda: -utilities(space, replace(prm, **live))[index], list(live.values()))
    return replace(prm, **{n: t.detach() for n, t in live.items()})


def maximise_elbo(space: Space, prm: Params) -> Params:
    """A local maximiser of the exact ELBO over both players jointly, by LBFGS from `prm`."""
    live = prm.detached()
    tensors = [t.requires_grad_(True) for t in (live.W, live.b, live.V, live.c)]
    _lbfgs(lambda: -elbo(space, live), tensors)
    return live.detached()


def adam_dynamics(space: Space, prm: Params, *, steps: int, lr: float, schedule: str = "alternating",
                  betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> Params:
    """The trainer's update rule with exact gradients: plain Adam per player (torch's formula; lr, betas, eps as
    `engines.*`) on -L_p and -L_q. alternating: a decoder step, then the encoder's gradient at the updated
    decoder (METHOD §4.1); simultaneous: both gradients at the same point (§4.2)."""
    cur = prm.detached()
    moments = {n: (torch.zeros_like(getattr(cur, n)), torch.zeros_like(getattr(cur, n))) for n in DECODER + ENCODER}
    for t in range(1, steps + 1):
        grads = gradients(space, cur)
        for names in (DECODER, ENCODER):
            if names == ENCODER and schedule == "alternating":
                grads = gradients(space, cur)  # the dream comes from the updated decoder
            for n in names:
                m, v = moments[n]
                g = -getattr(grads, n)  # descent on the loss -L
                m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
                v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
                denom = (v.sqrt() / (1 - betas[1] ** t) ** 0.5).add_(eps)
                cur = replace(cur, **{n: getattr(cur, n) - lr / (1 - betas[0] ** t) * m / denom})
    return cur


def solve_equilibrium(space: Space, prm: Params, *, tol: float = 1e-11, max_iter: int = 100) -> Params:
    """A root of the game's gradient field near `prm` (Newton's method with a backtracking line search on the
    field's norm). Each utility is concave in its own player, so a root is a Nash equilibrium of the family.

    Raises:
        RuntimeError: no root within `max_iter` steps (start closer, e.g. after `adam_dynamics`).
    """
    template, flat = prm.detached(), prm.detached().flat()

    def residual(v: Tensor) -> Tensor:
        return field(space, v.detach().requires_grad_(True), template).detach()

    for _ in range(max_iter):
        res = residual(flat)
        if float(res.norm()) < tol:
            return template.like(flat)
        jac = torch.autograd.functional.jacobian(lambda v: field(space, v, template), flat)
        step, scale = torch.linalg.solve(jac, -res), 1.0
        while float(residual(flat + scale * step).norm()) >= float(res.norm()) and scale > 1e-6:
            scale /= 2
        flat = flat + scale * step
    raise RuntimeError(f"no equilibrium found within {max_iter} Newton steps (|field| = {float(res.norm()):.3g})")
