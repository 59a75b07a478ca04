"""Layers shared by the families: the op-dispatching base module, MLPs and the p(x|z) head.

Every parameter lives in a leaf submodule that is used only through its own `__call__`, and no module
returns a parameter tensor itself, so ZeRO-3's per-module gather hooks always see full parameters.
Pure torch: must not import `dist`, `engines`, deepspeed or any I/O.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symeq_dist.models.distributions import Bernoulli, Distribution, Gaussian
from symeq_dist.models.logistic_mixture import DiscretizedLogisticMixture, num_params


class PackedDistribution(dict):
    """A Distribution's tensors as a dict, so ZeRO-3 sees (and hooks) every tensor a forward returns."""

    kind: type[Distribution]


def pack(value: Any) -> Any:
    """Replace Distribution objects in nested dicts/tuples/lists by PackedDistribution dicts."""
    if isinstance(value, Distribution):
        packed = PackedDistribution(vars(value))
        packed.kind = type(value)
        return packed
    if isinstance(value, dict):
        return {k: pack(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return _rebuild(value, [pack(v) for v in value])
    return value


def unpack(value: Any) -> Any:
    """Inverse of `pack` (on the hooked tensors ZeRO-3 hands back)."""
    if isinstance(value, PackedDistribution):
        dist = value.kind.__new__(value.kind)
        dist.__dict__.update(value)
        return dist
    if isinstance(value, dict):
        return {k: unpack(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return _rebuild(value, [unpack(v) for v in value])
    return value


def _rebuild(like: tuple | list, items: list[Any]) -> Any:
    """A tuple, named tuple or list of the same type as `like` holding `items`."""
    return type(like)(*items) if hasattr(like, "_fields") else type(like)(items)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in nested dicts/tuples/lists converted to `dtype` (no copy when already there)."""
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return _rebuild(value, [_cast(v, dtype) for v in value])
    return value


class OpModule(nn.Module):
    """Base of the player modules: `forward(op, *args, **kwargs)` dispatches to the private `_<op>`.

    Public operations are thin wrappers around `self.call(op, ...)`, so each one enters through
    `nn.Module.__call__` and DeepSpeed ZeRO-3's forward hooks gather the parameters first. `forward`
    returns Distribution objects packed as dicts of tensors: ZeRO-3 attaches its backward hooks to the
    tensors a module returns and cannot see inside other objects (it fails in backward otherwise).
    """

    OPS: ClassVar[tuple[str, ...]] = ()

    def forward(self, op: str, *args: Any, **kwargs: Any) -> Any:
        if op not in self.OPS:
            raise ValueError(f"{type(self).__name__}: unknown op {op!r}; valid ops: {', '.join(self.OPS)}")
        dtype = next(self.parameters()).dtype
        if dtype != torch.float32:  # bf16 engines: inputs follow the weights (fp32 inputs pass untouched)
            args, kwargs = _cast(args, dtype), _cast(kwargs, dtype)
        return pack(getattr(self, f"_{op}")(*args, **kwargs))

    def call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        """Run `op` through `__call__` (hooks fire) and hand back real Distribution objects."""
        return unpack(self(op, *args, **kwargs))


def draw(dist: Distribution, generator: torch.Generator | None, reparam: bool) -> Tensor:
    """A reparametrised/ZGR sample when `reparam`, else a detached sample."""
    return dist.rsample(generator) if reparam else dist.sample(generator)


def mlp(sizes: Sequence[int], activation: type[nn.Module], *, final_activation: bool) -> nn.Sequential:
    """Linear layers sizes[0] -> ... -> sizes[-1], `activation` between them (and after the last if asked)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if final_activation or i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class ConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d with the bias added after the transposed convolution instead of inside it: the same
    parameters and values, but oneDNN's strided deconvolution with a bias runs 1.5-2x (fp32) to 10-15x (bf16)
    slower than without (per op: benchmarks/conv_ops.py, docs/benchmarks.md "Training speed against a plain fp32
    loop"); the separate add costs one elementwise pass."""

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size,
                                              2, self.dilation)
        y = F.conv_transpose2d(x, self.weight, None, self.stride, self.padding, output_padding, self.groups,
                               self.dilation)
        return y if self.bias is None else y + self.bias.to(y.dtype).view(1, -1, 1, 1)  # autocast: stays bf16


class SkipMLP(nn.Module):
    """mlp(sizes)(v) + a bias-free Linear(sizes[0] -> sizes[-1])(v): g_theta and the reverse q(z0|z1) net."""

    def __init__(self, sizes: Sequence[int], activation: type[nn.Module] = nn.Tanh) -> None:
        super().__init__()
        self.main = mlp(sizes, activation, final_activation=False)
        self.skip = nn.Linear(sizes[0], sizes[-1], bias=False)

    def forward(self, v: Tensor) -> Tensor:  # (B, sizes[0]) -> (B, sizes[-1])
        return self.main(v) + self.skip(v)


class XHead(nn.Module):
    """Turns the image net's output into p(x|z): Bernoulli logits, a Gaussian mean with learned log sigma, or
    the parameters of a discretised logistic mixture (8-bit colour; `out` has `x_head_channels` channels).

    Gaussian: `sigma_shape` () is one global log sigma, the image shape one per pixel; init 0 (sigma = 1). The
    global one is stored with shape (1,), not as a 0-dim tensor: DeepSpeed's parameter broadcast at engine
    start cannot handle 0-dim parameters (it views them as bytes).
    The parameter is cloned inside this forward (never returned itself) for ZeRO-3.
    """

    def __init__(self, family: str, sigma_shape: tuple[int, ...] = (), *, channels: int = 1,
                 num_mixtures: int = 10, offset_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if family not in ("bernoulli", "gaussian", "logistic_mixture"):
            raise ValueError(f"x_dist must be 'bernoulli', 'gaussian' or 'logistic_mixture', got {family!r}")
        if offset_shape is not None and family != "bernoulli":
            raise ValueError(f"a pixel-logit offset needs Bernoulli x, got {family!r}")
        self.family, self.channels, self.num_mixtures = family, channels, num_mixtures
        self.log_sigma = nn.Parameter(torch.zeros(sigma_shape or (1,))) if family == "gaussian" else None
        self.offset: Tensor | None  # model.x_offset: a fixed logit per pixel, set by `set_x_offset`, checkpointed
        self.register_buffer("offset", None if offset_shape is None else torch.zeros(offset_shape))

    def forward(self, out: Tensor) -> PackedDistribution:  # out (B, x_head_channels, H, W)
        """Returns the distribution packed (see `pack`); callers `unpack` it."""
        if self.family == "logistic_mixture":
            return pack(DiscretizedLogisticMixture(out, self.channels, self.num_mixtures))
        if self.log_sigma is None:
            return pack(Bernoulli(out if self.offset is None else out + self.offset))
        return pack(Gaussian(out, self.log_sigma.clone()))


def x_offset_shape(cfg: Any) -> tuple[int, ...] | None:
    """The XHead offset buffer's shape for a model config: its image shape under model.x_offset=data_marginal."""
    return tuple(cfg.image_shape) if cfg.x_offset == "data_marginal" else None


def set_x_offset(module: nn.Module, marginal: Tensor) -> None:
    """model.x_offset=data_marginal: every XHead in `module` adds logit(marginal) (a pixel's probability of 1,
    image-shaped) to its Bernoulli logits. Call before the engines are built."""
    heads = [m for m in module.modules() if isinstance(m, XHead) and m.offset is not None]
    if not heads:
        raise ValueError("set_x_offset: no XHead with an offset (build the model with model.x_offset=data_marginal)")
    for head in heads:
        if tuple(marginal.shape) != tuple(head.offset.shape):
            raise ValueError(f"pixel marginal of shape {tuple(marginal.shape)}, the model's images are "
                             f"{tuple(head.offset.shape)}")
        head.offset.copy_(torch.logit(marginal.to(head.offset)))


def x_head_channels(family: str, channels: int, num_mixtures: int) -> int:
    """Channels the image net must output for XHead(family): C, or the logistic mixture's parameters."""
    return num_params(channels, num_mixtures) if family == "logistic_mixture" else channels
