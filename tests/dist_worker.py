"""Worker for the multi-process tests (run by torchrun): train, then dump this rank's full parameters."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from symeq_dist.api import build_trainer
from symeq_dist.config import load_config
from symeq_dist.runtime import dist
from symeq_dist.runtime.engines import full_state_dict
from symeq_dist.runtime.monitor import setup_logging


def main(argv: list[str]) -> None:
    cfg = load_config(None, argv)
    info = dist.init()
    setup_logging(info.rank)
    trainer = build_trainer(cfg, info, argv)
    try:
        trainer.train()
        params = {name: full_state_dict(engine) for name, engine in trainer.engines.items()}
        torch.save(params, Path(cfg.run_dir) / f"params_rank{info.rank}.pt")
    finally:
        trainer.close()
        dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
