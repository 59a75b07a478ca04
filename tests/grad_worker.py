"""Worker of the global-batch test (run by torchrun): each player's gradient, at ZeRO-0, on 16 fixed complete
pairs split over the ranks; rank 0 saves them."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from symeq_dist import game
from symeq_dist.config import load_config
from symeq_dist.models import build_players
from symeq_dist.priors import build_prior
from symeq_dist.runtime import dist
from symeq_dist.runtime.engines import build_engines

GLOBAL_BATCH = 16


def main(out: Path) -> None:
    info = dist.init()
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(None, ["model.kind=ladder", "model.num_z0=6", "model.num_z1=10", "model.trunk_width=16",
                             "model.mlp_width=16", f"train.batch_size={GLOBAL_BATCH}",
                             f"engines.ds_config={root / 'ds_config.json'}"])
    torch.manual_seed(cfg.seed)
    players = build_players(cfg.model)
    engines = build_engines({"encoder": players.encoder, "decoder": players.decoder}, cfg, info)
    x = (torch.rand(GLOBAL_BATCH, 1, 28, 28, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    enc, dec = players
    wake = game.complete_data(enc, dec, x, torch.Generator().manual_seed(2))  # the same pairs on every rank
    dreams = game.dream(dec, build_prior(cfg.prior, dec), GLOBAL_BATCH, torch.Generator().manual_seed(3), x.device)
    rows = torch.arange(GLOBAL_BATCH).chunk(info.world_size)[info.rank]  # this rank's share
    grads = {}
    for name, pairs in (("decoder", wake), ("encoder", dreams)):
        part = game.Pairs(x=pairs.x[rows], z={k: v[rows] for k, v in pairs.z.items()}, dists={})
        terms = game.decoder_loss(dec, part) if name == "decoder" else game.encoder_loss(enc, dec, part)
        engines[name].backward(terms.loss)  # all-reduces this engine's gradients at world size > 1
        grads[name] = {k: p.grad.detach().clone() for k, p in engines[name].module.named_parameters()}
    if info.is_main:
        torch.save(grads, out)
    dist.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
