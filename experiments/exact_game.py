"""Consistency of the symmetric equilibrium, exactly: the `bilinear` family on x in {0,1}^6, z in {0,1}^dz, every
expectation an enumerated sum (`symeq_dist.eval.exact`). The numbers of docs/consistency.md, "Exact check on
enumerable models":

    .venv/bin/python experiments/exact_game.py            # all of it (about 2 minutes on one core)
    .venv/bin/python experiments/exact_game.py --dz 1 --seeds 3

For each pi(x) and each dz, from several random initialisations (init_scale 1):
  * the symmetric equilibrium: the trainer's update rule with exact gradients (alternating Adam, lr 0.03), then
    Newton's method on the game's gradient field; its stability (largest real part of the field's Jacobian);
  * the ELBO optimum on the same family (LBFGS on the exact ELBO from the same initialisation);
  * at both: KL(pi(x) q(z|x) || pi(z) p(x|z)), and the x-marginals of the limiting chain (stationary law of
    T = Q P) and of random codes (p(x)) against pi(x), in total variation and KL(pi || .);
  * uniqueness: the largest TV between the chain kernels T of the equilibria found (T does not change under
    relabelling of z, so equal kernels mean the same equilibrium up to the game's symmetry);
  * the collapsed point W = V = 0 (biases at their best responses): its numbers, its stability, and where the
    dynamics go from a tiny initialisation (init_scale 1e-3).
Prints plain text; writes nothing.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Sequence

import numpy as np
import torch

from symeq_dist.config import model_config
from symeq_dist.eval import exact
from symeq_dist.eval.exact import Params, Space
from symeq_dist.models import build_players

DX, TOTAL, LR = 6, 2048, 0.03


def pi_laws() -> dict[str, torch.Tensor]:
    """The data laws: the mixture of tests/test_exact.py, and a rough seeded Dirichlet(1) law over the 64 states."""
    dirichlet = torch.from_numpy(np.random.default_rng(0).dirichlet(np.ones(2 ** DX)))
    return {"mixture(4 products, seed 1)": exact.mixture_counts(DX, TOTAL, components=4, seed=1).double() / TOTAL,
            "dirichlet(1, seed 0)": (dirichlet * 0.98 + 0.02 / 2 ** DX)}


def initial(dz: int, seed: int, scale: float) -> Params:
    torch.manual_seed(seed)
    return Params.of_players(*build_players(model_config(kind="bilinear", image_shape=(1, 1, DX), num_latents=dz,
                                                         init_scale=scale)))


def equilibrium(space: Space, init: Params, steps: int) -> tuple[Params, Params | None]:
    """Exact alternating Adam for `steps` (the end point), then Newton from there (None: no root nearby)."""
    end = exact.adam_dynamics(space, init, steps=steps, lr=LR)
    try:
        return end, exact.solve_equilibrium(space, end, max_iter=40)
    except RuntimeError:
        return end, None


def stability(space: Space, prm: Params) -> float:
    return float(torch.linalg.eigvals(exact.field_jacobian(space, prm)).real.max())


def row(label: str, space: Space, prm: Params, extra: str = "") -> str:
    r = exact.report(space, prm)
    return (f"  {label:<24} KL(joint) {r['joint_kl']:.4f}  ELBO {r['elbo']:.4f}  chain TV {r['chain_tv']:.4f} "
            f"KL {r['chain_kl']:.4f}  random-code TV {r['random_code_tv']:.4f} KL {r['random_code_kl']:.4f}  "
            f"E KL(q||p(z|x)) {r['posterior_gap']:.1e}  |game grad| {max(r['grad_decoder'], r['grad_encoder']):.1e}"
            f"  |W| {float(prm.W.abs().max()):.1f}{extra}")


def kernel_gap(space: Space, points: Sequence[Params]) -> float:
    kernels = [exact.transition(space, p) for p in points]
    return max((float(exact.tv(a, b).max()) for a, b in itertools.combinations(kernels, 2)), default=0.0)


def study(name: str, pi_x: torch.Tensor, dz: int, seeds: int, steps: int) -> None:
    space = Space(pi_x=pi_x, dz=dz)
    print(f"\npi = {name}, dz = {dz} (H(pi) = {-float((pi_x * pi_x.log()).sum()):.4f} nats)")
    equilibria, optima = [], []
    for seed in range(seeds):
        init = initial(dz, seed, 1.0)
        end, root = equilibrium(space, init, steps)
        if root is None:
            print(row(f"seed {seed} dynamics end", space, end, "  (Newton found no root near it)"))
        else:
            equilibria.append(root)
            moved = max(exact.conditional_tv(space, end, root).values())
            print(row(f"seed {seed} symmetric", space, root,
                      f"  Newton moved {moved:.3f}  stability {stability(space, root):+.1e}"))
        optimum = exact.maximise_elbo(space, init)
        optima.append(optimum)
        print(row(f"seed {seed} ELBO optimum", space, optimum))
    print(f"  largest TV between the chain kernels of the equilibria found: {kernel_gap(space, equilibria):.2e}"
          f"; of the ELBO optima: {kernel_gap(space, optima):.2e}")
    collapsed = exact.collapsed(space)
    print(row("collapsed W = V = 0", space, collapsed, f"  stability {stability(space, collapsed):+.1e}"))
    tiny = initial(dz, 0, 1e-3)
    for n in (steps // 4, steps):
        end = exact.adam_dynamics(space, tiny, steps=n, lr=LR)
        print(row(f"from init 1e-3, {n} steps", space, end, "  TV(T, T_collapsed) "
                  f"{float(exact.tv(exact.transition(space, end), exact.transition(space, collapsed)).max()):.3f}"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dz", type=int, nargs="+", default=[1, 2, 3], help="latent bits (default 1 2 3)")
    parser.add_argument("--seeds", type=int, default=4, help="initialisations per setting (default 4)")
    parser.add_argument("--steps", type=int, default=4000, help="exact Adam steps before Newton (default 4000)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest
    start = time.perf_counter()
    for (name, pi_x), dz in itertools.product(pi_laws().items(), args.dz):
        study(name, pi_x, dz, args.seeds, args.steps)
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
