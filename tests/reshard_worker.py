"""Worker for tests/test_reshard.py (run by torchrun): resume if asked, dump the full engine and rank state,
train to train.steps (the last step writes a checkpoint), dump again.

`python reshard_worker.py PHASE OVERRIDES...` writes <run_dir>/PHASE_{loaded,saved}_rank<r>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from symeq_dist.api import build_trainer
from symeq_dist.config import load_config
from symeq_dist.runtime import dist
from symeq_dist.runtime.monitor import setup_logging
from symeq_dist.train.trainer import Trainer

MOMENTS = ("exp_avg", "exp_avg_sq")


def full_optimizer_state(engine: Any) -> dict[str, Any]:
    """Per parameter: fp32 master weight and Adam moments gathered in full (collective at ZeRO 1-3)."""
    params: dict[str, dict[str, torch.Tensor]] = {}
    if engine.zero_optimization_stage() == 0:  # a plain torch Adam over the module's own fp32 parameters
        base = engine.optimizer
        for name, param in engine.module.named_parameters():
            params[name] = {"fp32": param.detach().clone(), **{k: base.state[param][k].clone() for k in MOMENTS}}
    else:
        base = engine.optimizer.optimizer
        for name, param in engine.module.named_parameters():
            params[name] = {"fp32": safe_get_full_fp32_param(param).clone(),
                            **{k: safe_get_full_optimizer_state(param, k).clone() for k in MOMENTS}}
    steps = sorted({float(state["step"]) for state in base.state.values() if "step" in state})
    groups = [{k: v for k, v in group.items() if k != "params"} for group in base.param_groups]
    return {"params": params, "steps": steps, "global_steps": engine.global_steps, "groups": groups}


def dump(trainer: Trainer, path: Path) -> None:
    engines = {name: full_optimizer_state(engine) for name, engine in trainer.engines.items()}
    torch.save({"engines": engines, "chain": trainer.chain.cpu(), "train": trainer.state.step,
                "stream": trainer.stream.state_dict()}, path)


def main(argv: list[str]) -> None:
    phase, *overrides = argv
    cfg = load_config(None, overrides)
    info = dist.init()
    setup_logging(info.rank)
    trainer = build_trainer(cfg, info, overrides)
    try:
        if cfg.resume:
            dump(trainer, Path(cfg.run_dir) / f"{phase}_loaded_rank{info.rank}.pt")
        trainer.train()
        dump(trainer, Path(cfg.run_dir) / f"{phase}_saved_rank{info.rank}.pt")
    finally:
        trainer.close()
        dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
