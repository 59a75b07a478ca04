"""The DeepSpeed engines, one per player: the ONLY caller of `deepspeed.initialize`.

`ds_config.json` holds what both engines share (precision, ZeRO stage, explicit gradient clipping); the
run config holds each player's optimiser (`engines.encoder`, `engines.decoder`) and the one batch size.
This module merges them into one config dict per engine. The game decides which modules get engines: the
symmetric game two (`encoder`, `decoder`), the ELBO baseline one `joint` engine over both players with one
parameter group each, because its gradient flows from the decoder into the encoder (METHOD.md §9).
Must not import game or data.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
from torch import nn

from symeq_dist.config import ConfigError, EngineConfig, RunConfig
from symeq_dist.errors import MissingInput
from symeq_dist.runtime.dist import DistInfo
from symeq_dist.runtime.ops import ensure_loaded

log = logging.getLogger(__name__)

# Numbers with one home elsewhere: batch sizes come from train.*, optimisers from engines.<player>.
FORBIDDEN_KEYS = {
    "train_batch_size": "train.batch_size",
    "train_micro_batch_size_per_gpu": "train.batch_size (the micro batch is derived)",
    "gradient_accumulation_steps": "train.grad_accumulation",
    "optimizer": "engines.encoder / engines.decoder (lr, betas, eps, weight_decay)",
    "scheduler": "engines.encoder / engines.decoder",
}


@dataclass(frozen=True)
class Engines:
    """The engines by name ("encoder"/"decoder", or "joint"), the dtype of their weights and inputs (`bf16`
    section: bfloat16) and the dtype their forwards autocast to (`torch_autocast` section; weights stay fp32)."""

    engines: dict[str, Any]
    dtype: torch.dtype
    autocast: torch.dtype | None = None

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(self.engines.items())

    def __getitem__(self, name: str) -> Any:
        return self.engines[name]

    def forward_context(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Where the players' forwards run (the game's losses and sampling; backward and step stay outside):
        `torch.autocast` to the ds_config's torch_autocast dtype, or nothing. The game calls the modules'
        methods, not `engine.forward`, so DeepSpeed's own autocast wrapper never runs; this is its equivalent."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast)


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """Read the shared DeepSpeed settings and reject numbers that belong to the run config.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: a forbidden key is set, or `gradient_clipping` is absent (DeepSpeed would clip at 1.0).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{path} not found; set engines.ds_config to the shared DeepSpeed JSON "
                                f"(the repository root has ds_config.json)")
    try:
        base = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); fix it or set engines.ds_config to another file "
                          "(the repository root has ds_config.json)") from None
    if not isinstance(base, dict):
        raise ConfigError(f"{path} must hold a JSON object of DeepSpeed settings, got {type(base).__name__}")
    for key, home in FORBIDDEN_KEYS.items():
        if key in base:
            raise ConfigError(f"{path}: '{key}' must not be set here; it has one home in the run config: {home}")
    autocast = base.get("torch_autocast", {})
    if not isinstance(autocast, dict):
        raise ConfigError(f"{path}: 'torch_autocast' must be an object like {{\"enabled\": true, \"dtype\": "
                          f"\"bfloat16\"}}, got {autocast!r}")
    if autocast.get("enabled"):
        if base.get("bf16", {}).get("enabled") or base.get("fp16", {}).get("enabled"):
            raise ConfigError(f"{path}: 'torch_autocast' and 'bf16'/'fp16' are both enabled; choose one: bf16 keeps "
                              "bf16 weights (fp32 master copy in the optimiser), torch_autocast keeps fp32 weights and "
                              "runs the forwards in bf16")
        if autocast.get("dtype", "bfloat16") not in ("bfloat16", "bf16", "torch.bfloat16"):
            raise ConfigError(f"{path}: torch_autocast dtype {autocast.get('dtype')!r} is not supported; use "
                              "\"bfloat16\" (float16 autocast needs a loss scaler that the trainer's skip logic "
                              "does not drive)")
    if "gradient_clipping" not in base:
        raise ConfigError(f"{path}: set 'gradient_clipping' explicitly (0.0 = off, as in the paper); "
                         "DeepSpeed silently clips at 1.0 when the key is missing")
    return base


def _optimizer(eng: EngineConfig) -> dict[str, Any]:
    # adam_w_mode False: DeepSpeed's "Adam" is AdamW otherwise; torch_adam keeps resume bitwise (STACK.md).
    return {"type": "Adam", "params": {"lr": eng.lr, "betas": list(eng.betas), "eps": eng.eps,
                                       "weight_decay": eng.weight_decay, "torch_adam": True,
                                       "adam_w_mode": False}}


def engine_config(base: dict[str, Any], eng: EngineConfig, *, micro_batch: int, grad_accumulation: int,
                  world_size: int) -> dict[str, Any]:
    """One engine's DeepSpeed dict: shared settings + this player's optimiser + the derived batch sizes."""
    cfg = copy.deepcopy(base)
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = grad_accumulation
    cfg["train_batch_size"] = micro_batch * grad_accumulation * world_size
    cfg["optimizer"] = _optimizer(eng)
    if eng.zero_stage is not None:
        cfg.setdefault("zero_optimization", {})["stage"] = eng.zero_stage
    return cfg


def _initialize(module: nn.Module, params: Any, ds_cfg: dict[str, Any]) -> Any:
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, config=ds_cfg)
    return engine


def build_engines(modules: dict[str, nn.Module], cfg: RunConfig, info: DistInfo) -> Engines:
    """One DeepSpeed engine per entry of `modules` (the game's: encoder + decoder, or one joint module).

    An engine's module is one player (its optimiser settings: `engines.<player>`), or holds several in a
    `players` mapping (the joint ELBO module): then each player gets its own parameter group.
    """
    base = load_ds_config(cfg.engines.ds_config)
    micro = cfg.micro_batch_size(info.world_size)
    ensure_loaded()  # before DeepSpeed loads it: never hangs on a lock a killed process left
    dtype = torch.bfloat16 if base.get("bf16", {}).get("enabled") else torch.float32
    autocast = torch.bfloat16 if base.get("torch_autocast", {}).get("enabled") else None
    kw = {"micro_batch": micro, "grad_accumulation": cfg.train.grad_accumulation, "world_size": info.world_size}
    engines = {}
    for name, module in modules.items():
        module.to(info.device)
        players = getattr(module, "players", None)
        if players is None:
            params, eng = module.parameters(), getattr(cfg.engines, name)
        else:
            params = [_group(sub, getattr(cfg.engines, player)) for player, sub in players.items()]
            eng = getattr(cfg.engines, list(players)[-1])  # defaults only: every group sets its own values
        engines[name] = _initialize(module, params, engine_config(base, eng, **kw))
    for name, engine in engines.items():
        if info.world_size == 1 and zero_stage(engine) == 0:
            # A one-rank gradient all-reduce only flattens and copies (measured: ~6% of a small step).
            engine.enable_backward_allreduce = False
        if cfg.train.channels_last:
            _channels_last(name, engine)
        log.info("engine %s: ZeRO stage %d, micro batch %d x accumulation %d x world %d",
                 name, engine.zero_optimization_stage(), micro, cfg.train.grad_accumulation, info.world_size)
    return Engines(engines=engines, dtype=dtype, autocast=autocast)


def _channels_last(name: str, engine: Any) -> None:
    """train.channels_last: the conv weights re-laid out NHWC in place (same Parameter objects, same values).
    Only at ZeRO-0, and only after `deepspeed.initialize`: its start-up broadcast views every parameter as bytes
    (fails on NHWC strides), and ZeRO 1-3 keep the parameters as views of flat buffers that a re-layout would cut
    loose. There only the image batches are channels-last (the trainer converts them), which changes nothing for
    inputs with one channel or 1x1 maps (the ladders'): a convolution follows its input's layout only when that
    is unambiguous."""
    if zero_stage(engine) != 0:
        log.warning("engine %s: train.channels_last leaves its weights NCHW at ZeRO stage %d (flat parameter "
                    "buffers); only image batches of several channels are channels-last", name, zero_stage(engine))
        return
    with torch.no_grad():
        for param in engine.module.parameters():
            if param.dim() == 4:
                # .to, not .contiguous: a 1x1 kernel counts as channels-last-contiguous in either layout, and only
                # .to re-strides it the way the convolutions detect (as module.to(memory_format=...) does)
                param.data = param.data.to(memory_format=torch.channels_last)


def _group(module: nn.Module, eng: EngineConfig) -> dict[str, Any]:
    return {"params": list(module.parameters()), "lr": eng.lr, "betas": eng.betas, "eps": eng.eps,
            "weight_decay": eng.weight_decay}


def zero_stage(engine: Any) -> int:
    return int(engine.zero_optimization_stage())


def begin_micro_batch(engine: Any) -> None:
    """What `engine.forward()` does before a micro-batch's forward, for the players' methods that the game calls
    instead of it. DeepSpeed 0.19's ZeRO optimisers count a micro-batch there (`clear_backward_seen_flag`):
    without it, ZeRO-3 overwrites the accumulated gradient partition with each micro-batch's (only the last
    of `train.grad_accumulation` micro-batches counted; ZeRO 1-2 clear their accumulation buffers there)."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    if isinstance(engine.optimizer, ZeROOptimizer):
        engine.optimizer.clear_backward_seen_flag()


def full_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The engine's module parameters gathered in full on every rank (ZeRO-3 partitions them)."""
    module = engine.module
    if zero_stage(engine) < 3:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def consolidated_weights(engine: Any) -> dict[str, torch.Tensor]:
    """The engine's module state dict in full fp32 on the CPU, on every rank: the optimiser's fp32 master weights
    where it keeps them (bf16, ZeRO 1-3), else the module's own. Collective at ZeRO 1-3: every rank calls it."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for key, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        state[key] = (param.detach() if full is None else full).float().cpu().clone()
    for key, buffer in engine.module.named_buffers():
        state[key] = buffer.detach().cpu().clone()
    return state


def discard_gradients(engine: Any) -> None:
    """Throw away the gradients of a backward whose step is skipped, as DeepSpeed's own overflow path does.

    Call it at or before the accumulation boundary, without the boundary's engine.step(). ZeRO 0-2: the
    module's and the optimiser's gradient buffers. ZeRO-3 keeps the reduced gradient partitions in
    the optimiser: its fp16-overflow clean-up (zero_grad, which also restarts the accumulation, and dropping the
    averaged partitions or the CPU-offload buffers) is exactly a discarded step.
    """
    stage, optimizer = zero_stage(engine), engine.optimizer
    engine.module.zero_grad(set_to_none=True)
    # the micro-batches of this iteration that were already counted (engine.step() before the boundary) are
    # taken back, so the next iteration's accumulation boundary falls where it would have
    engine.micro_steps -= engine.micro_steps % engine.gradient_accumulation_steps()
    if stage == 3:
        optimizer.zero_grad(set_to_none=True)
        if getattr(optimizer, "offload_optimizer", False):
            optimizer.reset_cpu_buffers()
        else:
            optimizer.averaged_gradients = {}
        return
    optimizer.zero_grad(set_to_none=True)
    if stage == 0:
        return
    release = getattr(optimizer, "_release_preflattened_grad_buffers", None)
    if release is not None:
        release()
    for key in list(getattr(optimizer, "averaged_gradients", {})):
        optimizer.averaged_gradients[key] = None
        optimizer.all_grad_tensors[key] = None
    optimizer.micro_step_id = -1  # INITIAL_MICRO_STEP_ID: the next backward starts a fresh accumulation


def player_state(by_engine: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Per player: an engine named after a player holds its weights; a joint engine's keys are
    "<player>.<parameter>" (the attributes of `models.JointModule`)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, state in by_engine.items():
        if name in ("encoder", "decoder"):
            out[name] = state
            continue
        for key, value in state.items():
            player, _, rest = key.partition(".")
            out.setdefault(player, {})[rest] = value
    return out
