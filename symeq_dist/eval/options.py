"""What `symeq eval` is asked for and what it loads besides the players (`eval.model.load_trained`): the
options and the feature networks (the FD-clf network, trained on first use; Inception only from a file).

Must not import train, tensorboard or deepspeed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from symeq_dist.config import RunConfig
from symeq_dist.eval.diagnostics import parse_chain_lengths
from symeq_dist.eval.features import INCEPTION_FILE, FeatureExtractor, load_classifier_features, load_inception_features
from symeq_dist.eval.features.classifier import describe_target, estimate_seconds, train_classifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalOptions:
    run_dir: Path
    n: int = 10_000
    """Samples per generated set (the reference set is the held-out/training split, at most n images)."""
    chain_steps: int | tuple[int, ...] = 1000
    """Limiting-chain length, or several lengths measured in one pass over the chain (e.g. (0, 10, 100, 1000))."""
    step: int | None = None
    """Checkpoint step to evaluate (its checkpoint must still exist); None: the latest."""
    seed: int = 0
    ema: bool = True
    """Use the run's averaged weights when it keeps them (`train.ema_decay`); False: the trained weights (the ones
    the training grids show; an average with decay 0.999 still carries the initial weights early in a run)."""
    batch_size: int = 500
    """Images generated and embedded at once (bounds memory)."""
    features: Path | None = None
    """Feature-network checkpoint (must exist); default <shards>/classifier.pt, trained there on first use."""
    train_features: bool = True
    """Train the default feature network when it is missing (False: stop with an error naming the command)."""
    feature_epochs: int = 5
    """Epochs of that training (5 = `symeq eval train-features`'s default: the same network and name)."""
    feature_threads: int | None = 1
    """Torch threads of that training (1: its bytes, so its name, do not depend on the core count)."""
    inception_weights: Path | None = None
    """pytorch-fid's Inception weights; default $TORCH_HOME/hub/checkpoints/<file> if it exists, else FID is skipped."""
    tsne_points: int = 2000
    iw_samples: int = 1
    """Bits/dim on the held-out split: 1 = the negative ELBO; K > 1 adds the importance-weighted bound (K draws)."""
    progress: bool = True
    prior: Path | None = None
    """Evaluate with this prior in place of the run's own (the two-stage VAE: a run decoded from a separately trained
    prior): a `symeq prior train` run or a latent shard set. The report goes to eval/step_<step>-prior-<name>/;
    the run's own eval/ report and TensorBoard stay as they are."""

    @property
    def chain_lengths(self) -> tuple[int, ...]:
        """The chain lengths, sorted, without repeats."""
        return parse_chain_lengths(self.chain_steps)


def _default_inception() -> Path | None:
    home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    path = home / "hub" / "checkpoints" / INCEPTION_FILE
    return path if path.is_file() else None


def load_extractors(opts: EvalOptions, cfg: RunConfig,
                    device: torch.device) -> tuple[dict[str, FeatureExtractor], str | None]:
    """The FD-clf network (trained first when missing, see `feature_network_path`) and Inception (when a weights
    file is given or found); the reason if FID is skipped."""
    classifier = load_classifier_features(feature_network_path(opts, cfg))
    extractors: dict[str, FeatureExtractor] = {classifier.name: classifier.to(device)}
    weights = opts.inception_weights or _default_inception()
    if weights is None:
        return extractors, (f"no Inception weights: pass --inception-weights PATH to {INCEPTION_FILE} "
                            "(pytorch-fid's file; nothing is downloaded)")
    inception = load_inception_features(weights)
    extractors[inception.name] = inception.to(device)
    return extractors, None


def feature_network_path(opts: EvalOptions, cfg: RunConfig) -> Path:
    """The FD-clf network's checkpoint: `opts.features` as given, else the cached one, trained first if missing.

    The cache is <shards>/classifier.pt (one per data set: every run on the shards is measured with the same
    network), or <run_dir>/eval/classifier.pt when the shards' directory is not writable. The training is
    `symeq eval train-features <shards>` with its defaults (seed 0, one thread), so either way gives the same file.
    """
    if opts.features is not None:
        return opts.features  # named by the user: used as it is, an error if it is missing
    shards = Path(cfg.data.shards)
    cached = [shards / "classifier.pt", opts.run_dir / "eval" / "classifier.pt"]
    found = next((path for path in cached if path.is_file()), None)
    if found is not None or not opts.train_features:
        return found or cached[0]  # a missing file fails in load_classifier_features, naming the command
    path = cached[0] if os.access(shards, os.W_OK) else cached[1]
    seconds = estimate_seconds(shards, opts.feature_epochs) / (opts.feature_threads or os.cpu_count() or 1)
    log.info("no feature network for %s: training one (%d epochs, ~%s; %s) -> %s, as `symeq eval train-features "
             "%s` does, once per data set (--threads 0 uses every core; --no-train-features stops instead)", shards,
             opts.feature_epochs, f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min",
             describe_target(shards), path, shards)
    train_classifier(shards, path, epochs=opts.feature_epochs, seed=0, num_threads=opts.feature_threads,
                     progress=opts.progress)
    return path
