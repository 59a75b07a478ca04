"""Worker for the multi-process tests (run by torchrun): train, then dump this rank's full parameters (and, with
SYMEQ_TEST_COUNT_SYNCS=N set, this rank's host syncs from symeq_dist code over the steps after the first N)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from symeq_dist.api import build_trainer
from symeq_dist.config import load_config
from symeq_dist.runtime import dist
from symeq_dist.runtime.engines import full_state_dict
from symeq_dist.runtime.monitor import setup_logging
from symeq_dist.runtime.syncs import SyncCounter


def main(argv: list[str]) -> None:
    cfg = load_config(None, argv)
    info = dist.init()
    setup_logging(info.rank)
    trainer = build_trainer(cfg, info, argv)
    try:
        after = int(os.environ.get("SYMEQ_TEST_COUNT_SYNCS", "-1"))
        if after >= 0:
            trainer.train(until=after)
            with SyncCounter() as syncs:
                trainer.train()
            (Path(cfg.run_dir) / f"syncs_rank{info.rank}.json").write_text(json.dumps(syncs.by_caller()))
        else:
            trainer.train()
        params = {name: full_state_dict(engine) for name, engine in trainer.engines.items()}
        torch.save(params, Path(cfg.run_dir) / f"params_rank{info.rank}.pt")
    finally:
        trainer.close()
        dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
