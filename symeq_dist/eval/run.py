"""`symeq eval`: the numbers every run gets, computed the same way every time (METHOD.md §13).

For the latest checkpoint of a run: Fréchet distances between held-out data and (a) random-code samples,
(b) limiting-chain samples (chains started from a decoder sample, `chain_steps` steps, then the mode/mean
image of one more step), (c) reconstructions, in the features of every available network (the dataset's
own classifier always, InceptionV3 only from a local weights file); the consistency gap (limiting minus
random code); per-latent mutual information of both players; a reconstruction error; a linear probe of
the labels on the encoder's codes; a t-SNE figure of prior, posterior and limiting-chain codes.
Images are generated and embedded in chunks: memory stays bounded whatever `n` is. Single process, on the
accelerator when there is one (`runtime.dist.local_device`), else the CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from symeq_dist import sampling
from symeq_dist.config import RunConfig
from symeq_dist.data import build_eval_batches, load_manifest, to_float
from symeq_dist.eval.features import INCEPTION_FILE, FeatureExtractor, load_classifier_features, load_inception_features
from symeq_dist.eval.features.classifier import describe_target, estimate_seconds, train_classifier
from symeq_dist.eval.figures import tsne_figure
from symeq_dist.eval.frechet import GaussianStats, frechet_distance_stats
from symeq_dist.eval.model import TrainedModel, load_trained
from symeq_dist.eval.probe import linear_probe_accuracy
from symeq_dist.eval.report import write_report
from symeq_dist.game.mi import DEAD_MI

log = logging.getLogger(__name__)
SETS = ("random_code", "limiting_chain", "reconstruction")


@dataclass(frozen=True)
class EvalOptions:
    run_dir: Path
    n: int = 10_000
    """Samples per generated set (the reference set is the held-out/training split, at most n images)."""
    chain_steps: int = 1000
    seed: int = 0
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
    progress: bool = True


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


def _reference_split(cfg: RunConfig) -> str:
    """METHOD.md §14 #9: the held-out split when it has >= 5,000 images, else the training split (stated)."""
    counts = {s: v["num_samples"] for s, v in load_manifest(cfg.data.shards)["splits"].items()}
    return cfg.data.eval_split if counts.get(cfg.data.eval_split, 0) >= 5000 else cfg.data.split


def _data_batches(cfg: RunConfig, split: str, n: int, batch_size: int,
                  device: torch.device) -> Iterator[dict[str, Tensor]]:
    """At most n images of a split, in shard order, as the model saw them (binarised or scaled)."""
    seen = 0
    for batch in build_eval_batches(cfg.data, split=split, batch_size=batch_size):
        take = min(len(batch["image"]), n - seen)
        if take <= 0:
            return
        seen += take
        label = batch.get("label")
        has_class = label is not None and label.ndim == 1  # attribute vectors are not classes
        yield {"x": to_float(batch["image"][:take], cfg.data).to(device), "label": label[:take] if has_class else None}


class Sets:
    """Generates the three sets chunk by chunk with one generator per set (reproducible under the seed)."""

    def __init__(self, model: TrainedModel, seed: int, chain_steps: int) -> None:
        self.model, self.chain_steps = model, chain_steps
        self.gens = {name: torch.Generator(device=model.device).manual_seed(seed * 1000 + i)
                     for i, name in enumerate(SETS)}

    @torch.no_grad()
    def random_code(self, num: int) -> Tensor:
        m = self.model
        return sampling.random_code(m.decoder, m.prior, num, self.gens["random_code"], m.device)

    @torch.no_grad()
    def limiting_chain(self, num: int, on_step: Callable[[int], None]) -> tuple[Tensor, dict[str, Tensor]]:
        """Chain images after `chain_steps` steps, and the encoder's codes of the final chain state."""
        m, gen = self.model, self.gens["limiting_chain"]
        x = sampling.init_chain("random_code", decoder=m.decoder, prior=m.prior, num=num, generator=gen,
                                device=m.device, image_shape=m.cfg.model.image_shape)
        x = sampling.run_chain(m.encoder, m.decoder, x, self.chain_steps, gen, on_step=on_step)
        z, _ = m.encoder.sample(x, m.decoder, gen)
        return sampling.output_image(m.decoder.x_dist(z)), z

    @torch.no_grad()
    def reconstruction(self, x: Tensor) -> Tensor:
        return sampling.reconstruct(self.model.encoder, self.model.decoder, x, self.gens["reconstruction"])


class Accumulators:
    """Feature statistics per (network, set), MI per factor, reconstruction error, t-SNE codes."""

    def __init__(self, extractors: dict[str, FeatureExtractor], tsne_points: int) -> None:
        self.extractors = extractors
        self.stats = {(net, s): GaussianStats(e.dim) for net, e in extractors.items() for s in ("data", *SETS)}
        self.mi: dict[str, list[tuple[Tensor, int]]] = {}
        self.recon = [0.0, 0]
        self.codes: dict[str, list[Tensor]] = {"prior": [], "posterior": [], "limiting": []}
        self.labels: dict[str, list[Tensor]] = {"prior": [], "posterior": [], "limiting": []}
        self.tsne_points = tsne_points

    @torch.no_grad()
    def embed(self, set_name: str, images: Tensor) -> None:
        for net, extractor in self.extractors.items():
            self.stats[(net, set_name)].update(extractor(images.float()))

    def add_mi(self, player: str, dists: dict[str, Any], size: int) -> None:
        for name, dist in dists.items():
            mi = dist.mutual_information()
            if mi is not None:
                self.mi.setdefault(f"{player}/{name}", []).append((mi.cpu(), size))

    def add_codes(self, set_name: str, codes: Tensor, labels: Tensor | None) -> None:
        have = sum(len(c) for c in self.codes[set_name])
        take = max(0, min(len(codes), self.tsne_points - have))
        if take:
            self.codes[set_name].append(codes[:take].reshape(take, -1).float().cpu())
            if labels is not None:
                self.labels[set_name].append(labels[:take].cpu())

    def mi_table(self) -> dict[str, dict[str, dict[str, float | int]]]:
        table: dict[str, dict[str, dict[str, float | int]]] = {"encoder": {}, "decoder": {}}
        for key, parts in self.mi.items():
            player, name = key.split("/", 1)
            mi = sum(v * n for v, n in parts) / sum(n for _, n in parts)
            table[player][name] = {"mean": float(mi.mean()), "active": int((mi >= DEAD_MI).sum()),
                                   "dims": int(mi.numel())}
        return table


def _recon_error(x: Tensor, rec: Tensor, binary: bool) -> float:
    """Summed per-pixel error: mismatches of the mode image (binary data) or squared error of the mean."""
    return float((rec != x).float().sum() if binary else (rec - x).pow(2).sum())


def _classify(extractor: FeatureExtractor, images: Tensor) -> Tensor | None:
    """Class ids (B,) for t-SNE colours, from a network trained on class labels; None for any other network
    (multi-label or rotation logits are no class ids: the points stay uncoloured)."""
    classify = getattr(extractor, "classify", None)
    if classify is None or getattr(extractor, "target", None) != "class":
        return None
    return classify(images.float()).argmax(1)


def _data_pass(model: TrainedModel, acc: Accumulators, batches: Iterator[dict[str, Tensor]], sets: Sets,
               gen: torch.Generator, bar: tqdm) -> None:
    binary = model.cfg.data.binarize_threshold is not None
    top = model.decoder.latent_names[0]
    for batch in batches:
        x = batch["x"]
        acc.embed("data", x)
        rec = sets.reconstruction(x)
        acc.embed("reconstruction", rec)
        acc.recon[0] += _recon_error(x, rec, binary)
        acc.recon[1] += x[0].numel() * len(x)
        with torch.no_grad():
            z, dists = model.encoder.sample(x, model.decoder, gen)
        acc.add_mi("encoder", dists, len(x))
        acc.add_codes("posterior", z[top], batch["label"])
        bar.update(len(x))


def _generated_pass(model: TrainedModel, acc: Accumulators, opts: EvalOptions, sets: Sets, gen: torch.Generator,
                    bar: tqdm) -> None:
    top, classifier = model.decoder.latent_names[0], next(iter(acc.extractors.values()))
    for start in range(0, opts.n, opts.batch_size):
        num = min(opts.batch_size, opts.n - start)
        images = sets.random_code(num)
        acc.embed("random_code", images)
        chain_images, codes = sets.limiting_chain(num, on_step=lambda _, k=num: bar.update(k))
        acc.embed("limiting_chain", chain_images)
        acc.add_codes("limiting", codes[top], _classify(classifier, chain_images))
        with torch.no_grad():
            z_top = model.prior.sample(num, gen, model.device)
            z, _, dists = model.decoder.sample(z_top, gen)
        acc.add_mi("decoder", dists, num)
        acc.add_codes("prior", z_top, _classify(classifier, sampling.output_image(model.decoder.x_dist(z))))
        bar.update(2 * num)


def _probe(model: TrainedModel, opts: EvalOptions, gen: torch.Generator) -> dict[str, Any]:
    """Linear probe of the labels on the encoder's codes (probabilities / means of every latent)."""
    cfg = model.cfg
    label = load_manifest(cfg.data.shards).get("label", {"kind": "class"})
    if label is None or label.get("kind") != "class":
        return None  # no class labels to probe (attributes or none)

    def codes(split: str) -> tuple[Tensor, Tensor]:
        zs, ys = [], []
        for batch in _data_batches(cfg, split, 1 << 62, opts.batch_size, model.device):  # whole splits
            with torch.no_grad():
                _, dists = model.encoder.sample(batch["x"], model.decoder, gen)
            zs.append(torch.cat([d.mean().reshape(len(batch["x"]), -1).float() for d in dists.values()], 1).cpu())
            ys.append(batch["label"])
        return torch.cat(zs), torch.cat(ys)

    train_z, train_y = codes(cfg.data.split)
    test_z, test_y = codes(cfg.data.eval_split)
    num_classes = int(load_manifest(cfg.data.shards)["num_classes"])
    accuracy = linear_probe_accuracy(train_z, train_y, test_z, test_y, num_classes=num_classes, seed=opts.seed)
    return {"accuracy": accuracy, "latent": "+".join(model.decoder.latent_names), "num_train": len(train_y),
            "num_test": len(test_y), "train_split": cfg.data.split, "test_split": cfg.data.eval_split}


def _tsne(acc: Accumulators, out_png: Path, seed: int) -> np.ndarray | None:
    codes = {k: torch.cat(v).numpy() for k, v in acc.codes.items() if v}
    if len(codes) < 2:
        return None
    labels = {k: (torch.cat(acc.labels[k]).numpy() if acc.labels[k] else None) for k in codes}
    return tsne_figure(codes, labels, out_png, seed=seed, perplexity=min(30.0, len(codes["prior"]) / 4),
                       title="codes of the top latent: prior, posterior on data, limiting chain")


def _fd_results(acc: Accumulators) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    fd = {net: {s: frechet_distance_stats(acc.stats[(net, "data")], acc.stats[(net, s)]) for s in SETS}
          for net in acc.extractors}
    gap = {net: values["limiting_chain"] - values["random_code"] for net, values in fd.items()}
    return fd, gap


def evaluate(opts: EvalOptions) -> dict[str, Any]:
    """Evaluate the latest checkpoint of `opts.run_dir`; writes <run_dir>/eval/ and eval/* scalars.

    Raises:
        CheckpointError: the run has no checkpoint (nothing is written).
        FileNotFoundError / ValueError: a missing or wrong classifier or Inception weights file (a missing default
            classifier is trained first unless `opts.train_features` is False).
    """
    model = load_trained(opts.run_dir)
    extractors, fid_skipped = load_extractors(opts, model.cfg, model.device)
    ref_split = _reference_split(model.cfg)
    acc = Accumulators(extractors, opts.tsne_points)
    sets, gen = Sets(model, opts.seed, opts.chain_steps), torch.Generator(device=model.device).manual_seed(opts.seed)
    ref_n = min(opts.n, load_manifest(model.cfg.data.shards)["splits"][ref_split]["num_samples"])
    total = ref_n + opts.n * (opts.chain_steps + 2)
    with tqdm(total=total, desc="eval", unit="img", disable=not opts.progress, dynamic_ncols=True) as bar:
        batches = _data_batches(model.cfg, ref_split, opts.n, opts.batch_size, model.device)
        _data_pass(model, acc, batches, sets, gen, bar)
        _generated_pass(model, acc, opts, sets, gen, bar)
    fd, gap = _fd_results(acc)
    out_dir = opts.run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    tsne_image = _tsne(acc, out_dir / "tsne.png", opts.seed)
    results = {
        "run_dir": str(opts.run_dir), "step": model.step, "seed": opts.seed, "n": opts.n,
        "chain_steps": opts.chain_steps, "game": model.cfg.game.kind, "model": model.cfg.model.kind,
        "reference": {"split": ref_split, "n": ref_n, "note": "held-out split" if ref_split ==
                      model.cfg.data.eval_split else "training split (held-out split has < 5,000 images)"},
        "fd": fd, "consistency_gap": gap, "fid_skipped": fid_skipped,
        "fd_networks": {name: e.info() if hasattr(e, "info") else {} for name, e in extractors.items()},
        "mi": acc.mi_table(),
        "reconstruction_error": {"metric": "pixel error rate (mode image)" if model.cfg.data.binarize_threshold
                                 is not None else "mean squared error (mean image)",
                                 "value": acc.recon[0] / max(acc.recon[1], 1)},
        "probe": _probe(model, opts, torch.Generator(device=model.device).manual_seed(opts.seed)),
        "figures": {"tsne": "tsne.png"} if tsne_image is not None else {},
    }
    write_report(out_dir, results)
    _log_tensorboard(opts.run_dir, results, tsne_image)
    return results


def _log_tensorboard(run_dir: Path, results: dict[str, Any], tsne_image: np.ndarray | None) -> None:
    from symeq_dist.runtime.monitor import Monitor

    monitor = Monitor(run_dir, enabled=True)
    step = results["step"]
    scalars = {f"eval/{net}/{s}": v for net, values in results["fd"].items() for s, v in values.items()}
    scalars.update({f"eval/{net}/gap": v for net, v in results["consistency_gap"].items()})
    if results["probe"] is not None:
        scalars["eval/probe_accuracy"] = results["probe"]["accuracy"]
    scalars["eval/reconstruction_error"] = results["reconstruction_error"]["value"]
    for player, factors in results["mi"].items():
        for name, row in factors.items():
            scalars[f"eval/{player}/mi/{name}_mean"] = row["mean"]
            scalars[f"eval/{player}/mi/{name}_active"] = row["active"]
    monitor.scalars(scalars, step)
    if tsne_image is not None:
        monitor.image_hwc("eval/tsne", tsne_image, step)
    monitor.close()
