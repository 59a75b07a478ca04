"""Random-code samples and the limiting chain x -> z ~ q(z|x) -> x ~ p(x|z) (METHOD.md §8); no_grad, pure torch.

The chain resamples x from p at every step (never its mean); only the final output image is a mode or
mean. At a consistent equilibrium its x-marginal is the data distribution, so limiting-chain samples
that are worse than random-code samples signal encoder/decoder disagreement.
Must not import engines or do I/O.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from symeq_dist.errors import InputError
from symeq_dist.models.distributions import Bernoulli, Distribution
from symeq_dist.priors import Prior


def output_image(dist: Distribution, output: str = "auto") -> Tensor:
    """The picture of p(x|z): mode for Bernoulli x, mean for Gaussian x (auto), or a sample."""
    if output == "auto":
        output = "mode" if isinstance(dist, Bernoulli) else "mean"
    if output == "mode":
        return dist.mode()
    if output == "mean":
        return dist.mean()
    if output == "sample":
        return dist.sample()
    raise ValueError(f"output must be auto, mode, mean or sample, got {output!r}")


@torch.no_grad()
def random_code(decoder: nn.Module, prior: Prior, num: int, generator: torch.Generator,
                device: torch.device, output: str = "auto") -> Tensor:
    """z ~ pi, ancestral decoder pass, then the output image of p(x|z). Returns (num, C, H, W)."""
    z, _, _ = decoder.sample(prior.sample(num, generator, device), generator)
    return output_image(decoder.x_dist(z), output)


@torch.no_grad()
def class_conditional(decoder: nn.Module, per_class: int, generator: torch.Generator, device: torch.device,
                      output: str = "auto") -> Tensor:
    """x ~ p(x | c) for every class c of a class latent (the decoder's categorical top), `per_class` each, class
    by class: (K * per_class, C, H, W), one grid row per class with per_class columns (METHOD §7.4)."""
    num_classes = decoder.latent_shapes[decoder.latent_names[0]][0]
    classes = torch.arange(num_classes, device=device).repeat_interleave(per_class)
    z, _, _ = decoder.sample(torch.nn.functional.one_hot(classes, num_classes).float(), generator)
    return output_image(decoder.x_dist(z), output)


@torch.no_grad()
def init_chain(kind: str, *, decoder: nn.Module, prior: Prior, num: int, generator: torch.Generator,
               device: torch.device, image_shape: tuple[int, ...], data: Tensor | None = None) -> Tensor:
    """Chain start: a full decoder sample (random_code), uniform noise, or the given data batch."""
    if kind == "random_code":
        _, x, _ = decoder.sample(prior.sample(num, generator, device), generator)
        return x
    if kind == "noise":
        return torch.rand((num, *image_shape), generator=generator, device=device)
    if kind == "data":
        if data is None or data.shape[0] < num:
            raise InputError(f"chain_init=data needs a held-out batch of at least {num} images; ask for fewer "
                             "chains or samples")
        return data[:num].clone()
    raise ValueError(f"chain init must be random_code, noise or data, got {kind!r}")


@torch.no_grad()
def chain_step(encoder: nn.Module, decoder: nn.Module, x: Tensor, generator: torch.Generator) -> Tensor:
    """One step of the limiting chain: z ~ q(z|x), then a fresh sample x ~ p(x|z)."""
    z, _ = encoder.sample(x, decoder, generator)
    return decoder.x_dist(z).sample(generator)


@torch.no_grad()
def chain_output(encoder: nn.Module, decoder: nn.Module, x: Tensor, generator: torch.Generator,
                 output: str = "auto") -> Tensor:
    """The picture after one more encode-decode step (METHOD.md §8: mode/mean of p(x|z))."""
    z, _ = encoder.sample(x, decoder, generator)
    return output_image(decoder.x_dist(z), output)


@torch.no_grad()
def run_chain(encoder: nn.Module, decoder: nn.Module, x: Tensor, steps: int, generator: torch.Generator,
              on_step: Callable[[int], None] | None = None) -> Tensor:
    """Advance the chain `steps` times from x; `on_step` gets the step index (progress bars)."""
    for i in range(steps):
        x = chain_step(encoder, decoder, x, generator)
        if on_step is not None:
            on_step(i)
    return x


@torch.no_grad()
def reconstruct(encoder: nn.Module, decoder: nn.Module, x: Tensor, generator: torch.Generator,
                output: str = "auto") -> Tensor:
    """One q -> p pass from data: the reconstruction grid."""
    return chain_output(encoder, decoder, x, generator, output)
