"""The two players' networks and their distributions; `build_players` builds both from a ModelConfig.

Player modules expose every operation through `forward(op, ...)` (ZeRO-3 gathers parameters in forward
hooks). Must not import `dist`, `engines`, deepspeed, webdataset or any I/O.
"""

from __future__ import annotations

from symeq_dist.config import ModelConfig
from symeq_dist.models.decoder import Decoder, HierarchicalDecoder, MLPDecoder, build_decoder
from symeq_dist.models.distributions import Bernoulli, Categorical, Distribution, Gaussian
from symeq_dist.models.encoder import Encoder, LadderEncoder, MLPEncoder, ReverseEncoder, build_encoder


def build_players(cfg: ModelConfig) -> tuple[Encoder, Decoder]:
    """(encoder, decoder) for `cfg.kind`: mlp (single latent), ladder or reverse (METHOD §10)."""
    return build_encoder(cfg), build_decoder(cfg)


__all__ = [
    "Bernoulli", "Categorical", "Decoder", "Distribution", "Encoder", "Gaussian", "HierarchicalDecoder",
    "LadderEncoder", "MLPDecoder", "MLPEncoder", "ReverseEncoder", "build_decoder", "build_encoder",
    "build_players",
]
