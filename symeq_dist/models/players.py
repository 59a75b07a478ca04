"""The two players' interfaces: what the game, sampling and evaluation may call on an encoder and a decoder.

Every public operation goes through `forward(op, ...)` (see `layers.OpModule`), so under DeepSpeed
ZeRO-3 the forward hooks gather a player's parameters once per operation. The decoder's `top_down`
returns every latent's conditional in one such operation: an encoder that needs the decoder's top-down
quantities (ladder sharing, METHOD §7.2) makes one decoder call per pass, however deep the hierarchy.
Pure torch: must not import `runtime`, deepspeed or any I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from symeq_dist.models.distributions import Distribution
from symeq_dist.models.layers import OpModule, draw

Latents = dict[str, Tensor]
Sample = tuple[Latents, dict[str, Distribution]]
Posterior = Callable[[str, Distribution | None, Tensor | None], Distribution]
"""The encoder's factor for latent `name`, given the decoder's conditional of it (None for the top) and the
decoder's top-down state where that latent enters (None for families without one)."""


class TopDown(NamedTuple):
    """What `Decoder.top_down` computed: every latent, the decoder's conditionals of the non-top latents, and
    its top-down state where each latent enters (families without such a state leave it empty)."""

    z: Latents
    priors: dict[str, Distribution]
    states: dict[str, Tensor]


class Decoder(OpModule):
    """Base of the decoder player theta: p(z_t | z_<t) for the non-top latents and p(x | z).

    Attributes:
        latent_names: ancestral order, top first: ("z",) or ("z0", "z1").
        latent_shapes: event shape per latent, e.g. {"z0": (30,), "z1": (100,)}.
        top_family: "bernoulli" or "gaussian": the family of the top latent (the prior's).

    Subclasses implement `_latent_conditional(name, z)` (p(z_name | z_<name) for every latent below the
    top) and `_x_dist(z)`; the base class builds every operation from those two.
    """

    OPS = ("conditionals", "sample", "x_dist", "top_down")
    latent_names: tuple[str, ...]
    latent_shapes: dict[str, tuple[int, ...]]
    top_family: str

    def conditionals(self, z: Latents) -> dict[str, Distribution]:
        """Teacher-forced p(z_t | z_<t) for every non-top latent, and "x": p(x | z); with grad."""
        return self.call("conditionals", z)

    def sample(self, z_top: Tensor, generator: torch.Generator | None = None,
               reparam: bool = False) -> tuple[Latents, Tensor, dict[str, Distribution]]:
        """Ancestral sample from the given top latent.

        Returns:
            z for every latent (the given top included), x sampled from p(x|z) (never its mean), and the
            distributions used, keyed like `conditionals`. reparam=True draws with `rsample`.
        """
        return self.call("sample", z_top, generator=generator, reparam=reparam)

    def x_dist(self, z: Latents) -> Distribution:
        """p(x | z) only."""
        return self.call("x_dist", z)

    def top_down(self, z: Latents | None = None, *, posterior: Posterior | None = None,
                 generator: torch.Generator | None = None, reparam: bool = False) -> TopDown:
        """The decoder's top-down pass over the latents, in ONE operation (one ZeRO-3 gather).

        For each latent in ancestral order the decoder computes its state and p(z_t | z_<t) (nothing for the
        top), then takes z_t from `z` when given (teacher forcing), else draws it from
        `posterior(name, p_t, state_t)` (an encoder's factor, which may combine the decoder's parameters or
        state with its own), else from p_t itself.
        """
        return TopDown(*self.call("top_down", z, posterior=posterior, generator=generator, reparam=reparam))

    # ---- private implementations, entered through forward
    def _latent_conditional(self, name: str, z: Latents) -> Distribution:
        raise NotImplementedError(f"{type(self).__name__} has no latent below the top")

    def _x_dist(self, z: Latents) -> Distribution:
        raise NotImplementedError

    def _top_down(self, z: Latents | None = None, posterior: Posterior | None = None,
                  generator: torch.Generator | None = None, reparam: bool = False) -> TopDown:
        z = dict(z or {})
        priors: dict[str, Distribution] = {}
        for i, name in enumerate(self.latent_names):
            p = self._latent_conditional(name, z) if i else None
            if p is not None:
                priors[name] = p
            if name not in z:
                z[name] = draw(pick(name, p, None, posterior), generator, reparam)
        return TopDown(z, priors, {})

    def _conditionals(self, z: Latents) -> dict[str, Distribution]:
        _, priors, _ = self._top_down(z)
        return {**priors, "x": self._x_dist(z)}

    def _sample(self, z_top: Tensor, generator: torch.Generator | None = None,
                reparam: bool = False) -> tuple[Latents, Tensor, dict[str, Distribution]]:
        z, priors, _ = self._top_down({self.latent_names[0]: z_top}, generator=generator, reparam=reparam)
        p_x = self._x_dist(z)
        return z, draw(p_x, generator, reparam), {**priors, "x": p_x}


def pick(name: str, prior: Distribution | None, state: Tensor | None, posterior: Posterior | None) -> Distribution:
    """The distribution latent `name` is drawn from in a top-down pass: the encoder's posterior when one is
    given, else the decoder's conditional (the top latent has none: it needs a value or a posterior)."""
    dist = posterior(name, prior, state) if posterior is not None else prior
    if dist is None:
        raise ValueError(f"top_down: the top latent {name!r} needs a value in z or a posterior")
    return dist


class Encoder(OpModule):
    """Base of the encoder player phi: q(z | x) in the family's factorisation.

    Attributes:
        analytic_kl: True when every q-factor aligns with a p-factor, so the ELBO can use analytic KLs
            (single latent, ladder); False for the reverse order.
    """

    OPS = ("sample", "conditionals")
    analytic_kl: bool

    def sample(self, x: Tensor, decoder: Decoder, generator: torch.Generator | None = None,
               reparam: bool = False, observed: Latents | None = None) -> Sample:
        """Ancestral pass through the encoder factorisation, x float (B, C, H, W).

        reparam=False: plain sampling (callers wrap it in no_grad); decoder terms are computed under
        no_grad. reparam=True (ELBO): rsample (Gaussian / ZGR) at every layer and decoder terms keep
        their graph, so theta gets gradients through the shared top-down path. `observed` (families with an
        observed top latent: class_mlp's "c", seg_hvae's "s"): {name: values, f"{name}_mask": (B,) 1 where observed}:
        those rows keep their values.

        Returns:
            z for every latent and the q-distributions used, both keyed by latent name.
        """
        if observed is None:
            return self.call("sample", x, decoder, generator=generator, reparam=reparam)
        return self.call("sample", x, decoder, generator=generator, reparam=reparam, observed=observed)

    def conditionals(self, x: Tensor, z: Latents, decoder: Decoder) -> dict[str, Distribution]:
        """Teacher-forced q-factors given complete (x, z); decoder terms under no_grad (METHOD §7.2)."""
        return self.call("conditionals", x, z, decoder)


@dataclass(frozen=True)
class Players:
    """The two players of one model, built together from one model config."""

    encoder: Encoder
    decoder: Decoder

    def items(self) -> list[tuple[str, nn.Module]]:
        return [("encoder", self.encoder), ("decoder", self.decoder)]

    def __iter__(self) -> Iterator[nn.Module]:  # encoder, decoder = build_players(cfg)
        return iter((self.encoder, self.decoder))


class JointModule(nn.Module):
    """Both players in one module, for a game with one engine over both (ELBO): `forward(fn, ...)`
    runs fn(encoder, decoder, ...) so ZeRO-3's hooks on this root module fire once per call.

    `players` names the parts, so the engine builder can give each player its own optimiser group.
    """

    def __init__(self, encoder: Encoder, decoder: Decoder) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    @property
    def players(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "decoder": self.decoder}

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.encoder, self.decoder, *args, **kwargs)
