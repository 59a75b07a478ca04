"""The ONE training loop. The order of one iteration is the method, so here it is in full.

game.kind = symmetric, game.schedule = alternating (reference order, METHOD.md §4.1):
  1. x0 <- next data batch for each of the train.grad_accumulation micro-batches (uint8, this rank's
     micro batch); x <- binarise/scale(x0) + noise                                             [data RNG]
  2-3. for each micro-batch: no_grad z ~ q_phi(z | x), ancestral through the encoder [wake RNG]; decoder
     engine: loss = -log p_theta(x, z); ranks agree the loss is finite; backward; [with game.grad_spike:
     ranks agree no local gradient norm is non-finite or spiking]; step (the update lands at the last)
  4-5. for each micro-batch: no_grad z'_0 ~ pi, (z', x') ~ p_theta with the UPDATED theta [dream RNG];
     encoder engine: the same checks for -log q_phi(z' | x'); backward; step
  A failed check in 3 skips both players on every rank; in 5 (the decoder has already stepped) it skips
  the encoder on every rank. Skips are counted (sys/skipped_steps) and capped (game.max_consecutive_skips).
schedule = simultaneous: per micro-batch, 2 and 4 both run first (same theta, phi), then 3 and 5 with both
  backwards before either step, so any failed check skips both players.
game.kind = elbo: one joint engine; loss = -ELBO(x) (reparametrised / ZGR); backward; step; a no_grad
dream feeds the decoder's MI monitor only.
The game (registry `symeq_dist.game.GAMES`) supplies the engines' modules and their losses in update
order; this loop owns the order of backward, agreement and step.
Then, once per iteration on every rank (ZeRO-3 forwards are collective):
  6. every monitor.mi_every: MI monitors updated from the wake (encoder) and dream (decoder) distributions
  7. the persistent limiting chain advances one step                                          [chain RNG]
  8. every monitor.log_every: one stacked all-reduce of the interval means -> TensorBoard (rank 0);
     every monitor.image_every: image grids [grid RNG]; every checkpoint.every: a collective checkpoint.
  9. ranks agree whether any got a preemption signal (fault.preempt_signals; the flags ride in the iteration's
     finite-loss all-reduces, so a signal after the last of them counts at the next step); if so, all
     checkpoint and raise Preempted (the CLI exits 75, the sbatch script requeues).
Host syncs: one per engine per micro-batch (the finite-loss agreement), one per engine step with the spike
guard on, one per logging interval (benchmarks/step_syncs.py counts them).
Engines step on every micro-batch; DeepSpeed applies the update at its accumulation boundary. The loss
check runs per micro-batch, the gradient check once per engine at the boundary, on the root of the summed
squared norms of its micro-batches' gradients; a failed check discards the engine's accumulated gradients
(any ZeRO stage) and rewinds its micro-step count, so the next iteration accumulates afresh.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from symeq_dist import sampling
from symeq_dist.config import RunConfig
from symeq_dist.data import add_noise, to_float
from symeq_dist.data.labelled import LabelledPool
from symeq_dist.game import Game, Labelled, MIMonitor, Round, Terms
from symeq_dist.models import Players
from symeq_dist.priors import Prior
from symeq_dist.runtime import checkpoint
from symeq_dist.runtime.dist import DistInfo, agree_any, all_gather, all_reduce, peak_memory_bytes, reduce_stats
from symeq_dist.runtime.ema import EMA
from symeq_dist.runtime.engines import Engines, begin_micro_batch, discard_gradients
from symeq_dist.runtime.monitor import Monitor
from symeq_dist.train.drills import FaultPlan
from symeq_dist.train.guards import GradGuard, NonFiniteLoss
from symeq_dist.train.preemption import Preempted, PreemptWatcher, mark_preempted
from symeq_dist.train.progress import Progress
from symeq_dist.train.state import TrainState, make_generators

log = logging.getLogger(__name__)


class Trainer:
    """The loop over one run's pieces, built by `symeq_dist.api.build_trainer` and handed in ready."""

    def __init__(self, cfg: RunConfig, info: DistInfo, *, players: Players, game: Game, engines: Engines,
                 prior: Prior, stream: Any, eval_images: Tensor, monitor: Monitor,
                 faults: FaultPlan | None = None, labelled: LabelledPool | None = None) -> None:
        self.cfg, self.info, self.players, self.game = cfg, info, players, game
        self.engines, self.prior, self.stream, self.monitor = engines, prior, stream, monitor
        self.eval_images = eval_images                      # (num_grid, C, H, W) uint8, held-out
        self.labelled = labelled                            # semi-supervised runs: rows with observed classes
        self.micro = cfg.micro_batch_size(info.world_size)
        self.state = TrainState()
        self.gens = make_generators(cfg.seed, info.rank, info.device)
        self.mi = MIMonitor(cfg.monitor.mi_ema ** cfg.monitor.mi_every)
        self.chain = self._init_chain()
        self._sums: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), device=info.device))
        self._count, self._tick = 0, time.perf_counter()
        self.faults = faults or FaultPlan()
        self.guard = self._grad_guard()
        self._memory_logged = False
        self._watcher: PreemptWatcher | None = None  # set while train() runs
        self._preempt_vote: bool | None = None  # preemption flags agreed so far in this iteration (world > 1)
        self.ema = EMA(engines, cfg.train.ema_decay, info) if cfg.train.ema_decay else None

    def _grad_guard(self) -> GradGuard | None:
        game_cfg = self.cfg.game
        if not game_cfg.grad_spike:
            return None
        return GradGuard({name: engine.module for name, engine in self.engines.items()},
                         factor=game_cfg.grad_spike, warmup=game_cfg.grad_spike_warmup, state=self.state.grad_norms)

    # ------------------------------------------------------------------ state
    def _init_chain(self) -> Tensor:
        num = max(1, self.cfg.sampling.num_chains // self.info.world_size)
        return sampling.init_chain(
            self.cfg.sampling.chain_init, decoder=self.players.decoder, prior=self.prior, num=num,
            generator=self.gens["chain"], device=self.info.device, image_shape=self.cfg.model.image_shape,
            data=self._float(self.eval_images.to(self.info.device)))

    def rank_state(self) -> dict[str, Any]:
        prior = getattr(self.prior, "state_dict", None)  # streamed or buffered priors (priors/implicit.py)
        return {"train": asdict(self.state), "stream": self.stream.state_dict(), "chain": self.chain.cpu(),
                "prior": None if prior is None else prior(),
                "labelled": None if self.labelled is None else self.labelled.state_dict(),
                "mi": self.mi.state_dict(), "gens": {k: g.get_state() for k, g in self.gens.items()},
                "torch_rng": torch.get_rng_state()}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        self.state = TrainState(**state["train"])
        self.monitor.purge_after(self.state.step)  # drop what the interrupted run logged past its checkpoint
        if self.guard is not None:
            self.guard.state = self.state.grad_norms
        self.stream.load_state_dict(state["stream"])
        if hasattr(self.prior, "load_state_dict"):
            self.prior.load_state_dict(state.get("prior"), self.info.device)
        if self.labelled is not None:
            self.labelled.load_state_dict(state.get("labelled"), step=self.state.step)
        self.chain = state["chain"].to(self.info.device)
        self.mi.load_state_dict(state["mi"], self.info.device)
        if state["gens"] is None:  # resumed on another number of ranks: fresh per-rank streams (docs/resume.md)
            self.gens = make_generators(self.cfg.seed, self.info.rank, self.info.device, step=self.state.step)
        else:
            for key, gen in self.gens.items():
                gen.set_state(state["gens"][key])
        if state["torch_rng"] is not None:
            torch.set_rng_state(state["torch_rng"])

    # ------------------------------------------------------------------ one iteration
    def _float(self, images: Tensor) -> Tensor:
        return to_float(images, self.cfg.data).to(self.engines.dtype)

    def _next_x(self) -> Tensor:
        x0 = self._float(next(self.stream)["image"].to(self.info.device, non_blocking=True))
        x = add_noise(x0, self.cfg.data, self.gens["data"])
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.train.channels_last else x

    def _agree_finite(self, loss: Tensor) -> bool:
        """All ranks agree whether every rank's loss is finite (one tiny all-reduce, one host sync). The same
        all-reduce carries this rank's preemption flag, so the per-step preemption agreement needs no collective
        of its own (`_agreed_preempt`)."""
        if self.info.world_size == 1:
            return bool(torch.isfinite(loss.detach()))
        loss = loss.detach()
        flags = torch.stack([(~torch.isfinite(loss)).float().reshape(()),
                             loss.new_full((), float(self._signalled()), dtype=torch.float32)])  # no host copy
        bad, preempt = all_reduce(flags, self.info, op="max").tolist()
        self._preempt_vote = bool(preempt) or bool(self._preempt_vote)
        return bad == 0

    def _agree_grads(self, names: list[str]) -> tuple[bool, dict[str, float]]:
        """The gradient guard at an accumulation boundary: this rank's gradient norms of `names` and whether any
        rank's is non-finite or spiking, agreed on every rank (one all-reduce, one host sync for all of it)."""
        norms = torch.stack([self.guard.take(name).to(self.info.device) for name in names])
        bad = self.guard.bad(names, norms).any().float().reshape(1)
        if self.info.world_size > 1:
            bad = all_reduce(bad, self.info, op="max")
        values = torch.cat([bad, norms]).tolist()
        return values[0] > 0, dict(zip(names, values[1:], strict=True))

    def _signalled(self) -> bool:
        return self._watcher is not None and self._watcher.signalled is not None

    def _agreed_preempt(self) -> bool:
        """Whether any rank was signalled, agreed on every rank: read from this iteration's finite-loss agreements
        when it had any (a signal that lands after them is seen one step later), else one all-reduce."""
        vote, self._preempt_vote = self._preempt_vote, None
        return vote if vote is not None else agree_any(self._signalled(), self.info)

    def _discard(self, names: list[str]) -> bool:
        """Throw away what `names` accumulated in this iteration, on every rank (the caller agreed to)."""
        for name in names:
            discard_gradients(self.engines[name])
        return False

    def _backward(self, micro: dict[str, Terms], last: bool) -> bool:
        """The backward of every engine in `micro` (one micro-batch; all ranks agreed its losses are finite).
        Before the last micro-batch each engine only counts the micro-step; at the last (DeepSpeed's
        accumulation boundary) all of them step, or, if the gradient guard finds a non-finite or spiking
        gradient norm over this iteration's micro-batches on any rank, all discard it on every rank."""
        for name, terms in micro.items():
            self.engines[name].backward(terms.loss)
        if not last:
            for name, terms in micro.items():
                self.engines[name].step()  # not the boundary: DeepSpeed only counts the micro-step
                self._accumulate(f"train/{name}", terms.stats)
            return True
        norms: dict[str, float] = {}
        if self.guard:
            bad, norms = self._agree_grads(list(micro))
            if bad:
                log.warning("step %d: gradient norm spike or non-finite gradient on some rank (this rank: %s)",
                            self.state.step + 1, {n: f"{v:.3g}" for n, v in norms.items()})
                return self._discard(list(micro))
        for name, terms in micro.items():
            self.engines[name].step()
            self._accumulate(f"train/{name}", terms.stats)
            if self.guard:
                self.guard.accept(name, norms[name])
                self._sums[f"sys/grad_norm/{name}"] += norms[name]
        return True

    def _loss(self, name: str, rnd: Round) -> Terms:
        begin_micro_batch(self.engines[name])
        with self.engines.forward_context(self.info.device):
            terms = self.game.losses[name](rnd)
        if self.faults.faults and name == next(iter(self.game.losses)):  # drills hit the step's first loss
            terms = replace(terms, loss=self.faults.first_loss(terms.loss, self.state.step + 1, self.info.rank))
        return terms

    def _play(self, rounds: list[Round]) -> bool:
        """One iteration of the game over its micro-batches; False if the update was skipped on every rank.

        Alternating: each engine takes all its micro-batches (DeepSpeed updates at the last) before the next
        engine's loss is computed, so the encoder dreams from the updated decoder in every micro-batch and an
        iteration is the single-batch algorithm at the global batch. Simultaneous: per micro-batch, every
        loss, then every backward. A failed check discards what the affected engines accumulated so far.
        """
        names = list(self.game.losses)
        groups = [names] if self.cfg.game.schedule == "simultaneous" else [[name] for name in names]
        for group in groups:
            for i, rnd in enumerate(rounds):
                micro = {name: self._loss(name, rnd) for name in group}  # all from the same (theta, phi)
                if not self._agree_finite(sum(t.loss for t in micro.values())):
                    return self._discard(group)
                if not self._backward(micro, last=i == len(rounds) - 1):
                    return False
        if self.state.step % self.cfg.monitor.mi_every == 0:
            for rnd in rounds:
                for player, dists in self.game.monitored(rnd).items():
                    self.mi.update(player, dists)
        return True

    def _next_labelled(self) -> Labelled | None:
        if self.labelled is None:
            return None
        rows = self.labelled.draw(self.cfg.labelled_micro_batch_size(self.info.world_size))
        device = self.info.device
        return Labelled(x=self._float(rows["image"].to(device)), c=rows["c"].to(device),
                        mask=rows["c_mask"].to(device))

    def _iteration(self) -> None:
        rounds = [Round(x=self._next_x(), num_dreams=self.micro, gens=self.gens, labelled=self._next_labelled())
                  for _ in range(self.cfg.train.grad_accumulation)]
        if not self._play(rounds):
            self._skip()
        else:
            self.state.consecutive_skips = 0
            self.state.samples_seen += self.cfg.train.batch_size
            if self.ema is not None:
                self.ema.update()
        self.state.step += 1
        if not self._memory_logged:  # after this process's first step: what a step really needs
            self._memory_logged = True
            peaks = all_gather(torch.tensor([float(peak_memory_bytes(self.info.device))], device=self.info.device),
                               self.info)
            where = "CUDA max allocated" if self.info.device.type == "cuda" else "process peak RSS"
            log.info("peak memory after the first step, per rank (%s): %s", where,
                     ", ".join(f"{float(b) / 2**30:.2f} GiB" for b in peaks))
        every = self.cfg.sampling.chain_every
        if every and self.state.step % every == 0:
            with self.engines.forward_context(self.info.device):  # kept in the engines' dtype, not autocast's
                self.chain = sampling.chain_step(self.players.encoder, self.players.decoder, self.chain,
                                                 self.gens["chain"]).to(self.engines.dtype)

    def _skip(self) -> None:
        self.state.skipped_steps += 1
        self.state.consecutive_skips += 1
        game_cfg = self.cfg.game
        if game_cfg.nonfinite == "fail":
            raise NonFiniteLoss(f"a bad update (non-finite loss or gradient, or a gradient spike) at step "
                                f"{self.state.step} and game.nonfinite=fail; lower the learning rates, or set "
                                "game.nonfinite=skip")
        if self.state.consecutive_skips > game_cfg.max_consecutive_skips:
            raise NonFiniteLoss(f"{self.state.consecutive_skips} consecutive skipped steps (non-finite loss or "
                                f"gradient spike) at step {self.state.step} (cap game.max_consecutive_skips); "
                                "lower the learning rates")
        log.warning("step %d: non-finite loss or gradient spike on some rank; the update is skipped on every rank",
                    self.state.step + 1)

    # ------------------------------------------------------------------ monitoring
    def _accumulate(self, prefix: str, stats: dict[str, Tensor]) -> None:
        for key, value in stats.items():
            self._sums[f"{prefix}/{key}"] += value.float()
        self._count += 1 if prefix.endswith(("decoder", "joint")) else 0

    def _log_scalars(self) -> dict[str, float]:
        count = max(1, self._count)
        stats = {k: v / count for k, v in self._sums.items()}
        stats.update(self.mi.summary())
        stats["data/skipped"] = torch.tensor(float(self.stream.skipped), device=self.info.device)
        values = reduce_stats(stats, self.info)
        values["data/skipped"] *= self.info.world_size  # rank mean -> bad samples dropped by all ranks so far
        elapsed = time.perf_counter() - self._tick
        steps = self._count / self.cfg.train.grad_accumulation
        values["perf/samples_per_s"] = self.cfg.train.batch_size * steps / max(elapsed, 1e-9)
        values["perf/step_time_s"] = elapsed / max(steps, 1)
        values["sys/skipped_steps"] = float(self.state.skipped_steps)
        self.monitor.scalars(values, self.state.step)
        self._sums.clear()
        self._count, self._tick = 0, time.perf_counter()
        return values

    def log_images(self) -> None:
        """Grids of data, reconstructions, random-code samples and the persistent chain (collective)."""
        enc, dec, gen, step = self.players.encoder, self.players.decoder, self.gens["grid"], self.state.step
        data = self._float(self.eval_images.to(self.info.device))
        with self.engines.forward_context(self.info.device):
            grids = {"data": data,
                     "reconstruction": sampling.reconstruct(enc, dec, data, gen),
                     "random_code": sampling.random_code(dec, self.prior, len(data), gen, self.info.device),
                     "limiting_chain": sampling.chain_output(enc, dec, self.chain, gen)}
        for name, images in grids.items():
            self.monitor.image(f"samples/{name}", images.float(), step, save_as=f"{name}_{step:08d}.png")
        for key, mi in self.mi.ema.items():
            self.monitor.histogram(f"train/{key.split('/')[0]}/mi_hist/{key.split('/', 1)[1]}", mi, step)

    def save_checkpoint(self) -> None:
        meta = {"config": self.cfg.to_dict(), "samples_seen": self.state.samples_seen}
        checkpoint.save(self.cfg.run_dir, self.state.step, self.engines, self.rank_state(), meta=meta,
                        info=self.info, keep_last=self.cfg.checkpoint.keep_last,
                        ema=None if self.ema is None else self.ema.full())

    # ------------------------------------------------------------------ the loop
    def train(self, until: int | None = None) -> dict[str, float]:
        """Run until step `until` (default train.steps); returns the last logged scalars (rank-averaged)."""
        cfg, last = self.cfg, {}
        until = cfg.train.steps if until is None else min(until, cfg.train.steps)
        if self.state.step >= until:
            log.warning("nothing to train: the run is at step %d and train.steps=%d; raise train.steps to continue "
                        "(e.g. train.steps=%d)", self.state.step, cfg.train.steps, max(2 * self.state.step, 1))
            return last
        progress = Progress(enabled=self.info.is_main, bar=cfg.monitor.progress, total=cfg.train.steps,
                            initial=self.state.step, engines=list(self.game.losses))
        self._tick = time.perf_counter()
        with PreemptWatcher(cfg.fault.preempt_signals) as watcher, progress:
            self._watcher = watcher
            while self.state.step < until:
                self.faults.before_step(self.state.step + 1, self.info.rank)
                self._iteration()
                step, done = self.state.step, self.state.step == cfg.train.steps
                progress.step()
                if step % cfg.monitor.log_every == 0 or done:
                    last = self._log_scalars()
                    progress.report(step, last)
                if step % cfg.monitor.image_every == 0 or done:
                    self.log_images()
                saved = step % cfg.checkpoint.every == 0 or done
                if saved:
                    self.save_checkpoint()
                if self._agreed_preempt():  # every rank stops after this step
                    if not saved:
                        self.save_checkpoint()
                    if self.info.is_main:  # for the sbatch script, in case srun reports another task's code
                        mark_preempted(cfg.run_dir, step)
                    self.monitor.flush()
                    raise Preempted(step, watcher.signalled or "a preemption signal on another rank")
        self.monitor.flush()
        if self.state.step == cfg.train.steps:
            progress.summary(step=self.state.step, values=last, run_dir=Path(cfg.run_dir),
                             checkpoint=checkpoint.latest_dir(cfg.run_dir) if self.info.is_main else None)
        return last

    def close(self) -> None:
        self.monitor.close()
        self.stream.close()
        if hasattr(self.prior, "close"):  # a streamed prior's reader
            self.prior.close()
