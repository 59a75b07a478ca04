"""`symeq eval`: the numbers every run gets, computed the same way every time (METHOD.md §13).

For the latest checkpoint of a run, or the one of a given step: Fréchet distances between held-out data and
(a) random-code samples, (b) limiting-chain samples (chains started from a decoder sample; after each of the
`chain_steps` lengths, in one pass over the chain, the mode/mean image of one more step), (c) reconstructions,
in the features of every available network (the dataset's own classifier always, InceptionV3 only from a
local weights file); the consistency gap (limiting minus random code) per chain length; the consistency
diagnostics of `diagnostics.py`; per-latent mutual information of both players; a reconstruction error; a
linear probe of the labels on the encoder's codes; a t-SNE figure of prior, posterior and limiting-chain codes.
Reports go to <run_dir>/eval/step_<N>/ and are mirrored to <run_dir>/eval/ (the most recent evaluation).
Images are generated and embedded in chunks: memory stays bounded whatever `n` is. Single process, on the
accelerator when there is one (`runtime.dist.local_device`), else the CPU.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from symeq_dist import sampling
from symeq_dist.config import RunConfig
from symeq_dist.data import build_eval_batches, load_manifest, to_float
from symeq_dist.eval.classes import class_report
from symeq_dist.eval.diagnostics import Diagnostics
from symeq_dist.eval.features import FeatureExtractor
from symeq_dist.eval.figures import tsne_figure
from symeq_dist.eval.frechet import GaussianStats, frechet_distance_stats
from symeq_dist.eval.likelihood import bits_per_dim
from symeq_dist.eval.model import TrainedModel, load_trained, with_prior
from symeq_dist.eval.options import EvalOptions, feature_network_path, load_extractors
from symeq_dist.eval.probe import linear_probe_accuracy
from symeq_dist.eval.report import chain_key, write_report
from symeq_dist.eval.segmentation import segmentation_report
from symeq_dist.game.mi import DEAD_MI

__all__ = ["EvalOptions", "evaluate", "feature_network_path", "load_extractors"]
SETS = ("random_code", "limiting_chain", "reconstruction")  # the report's FD keys (plus limiting_chain@L)


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
    """Generates the sets chunk by chunk with one generator per set (reproducible under the seed)."""

    def __init__(self, model: TrainedModel, seed: int, chain_lengths: tuple[int, ...]) -> None:
        self.model, self.chain_lengths = model, chain_lengths
        self.gens = {name: torch.Generator(device=model.device).manual_seed(seed * 1000 + i)
                     for i, name in enumerate((*SETS, "chain_output"))}

    @torch.no_grad()
    def random_code(self, num: int) -> Tensor:
        m = self.model
        return sampling.random_code(m.decoder, m.prior, num, self.gens["random_code"], m.device)

    @torch.no_grad()
    def limiting_chain(self, num: int, on_step: Callable[[int], None]) -> dict[int, tuple[Tensor, dict[str, Tensor]]]:
        """One pass over `num` chains; after each length, the mode/mean image of one more step and its codes.

        The last length draws its output step from the chain's generator (as a single length does); the
        intermediate ones from their own, so they leave the chain's trajectory unchanged.
        """
        m, gen = self.model, self.gens["limiting_chain"]
        x = sampling.init_chain("random_code", decoder=m.decoder, prior=m.prior, num=num, generator=gen,
                                device=m.device, image_shape=m.cfg.model.image_shape)
        outputs, done = {}, 0
        for length in self.chain_lengths:
            x = sampling.run_chain(m.encoder, m.decoder, x, length - done, gen, on_step=on_step)
            done = length
            z, _ = m.encoder.sample(x, m.decoder, gen if length == self.chain_lengths[-1]
                                    else self.gens["chain_output"])
            outputs[length] = (sampling.output_image(m.decoder.x_dist(z)), z)
        return outputs

    @torch.no_grad()
    def reconstruction(self, x: Tensor) -> Tensor:
        return sampling.reconstruct(self.model.encoder, self.model.decoder, x, self.gens["reconstruction"])


class Accumulators:
    """Feature statistics per (network, set), MI per factor, reconstruction error, t-SNE codes, diagnostics."""

    def __init__(self, extractors: dict[str, FeatureExtractor], tsne_points: int, chain_lengths: tuple[int, ...],
                 diagnostics: Diagnostics) -> None:
        self.extractors = extractors
        self.sets = ("random_code", "reconstruction", *(chain_key(length) for length in chain_lengths))
        self.stats = {(net, s): GaussianStats(e.dim) for net, e in extractors.items() for s in ("data", *self.sets)}
        self.mi: dict[str, list[tuple[Tensor, int]]] = {}
        self.recon = [0.0, 0]
        self.codes: dict[str, list[Tensor]] = {"prior": [], "posterior": [], "limiting": []}
        self.labels: dict[str, list[Tensor]] = {"prior": [], "posterior": [], "limiting": []}
        self.tsne_points = tsne_points
        self.diagnostics = diagnostics

    @torch.no_grad()
    def embed(self, set_name: str, images: Tensor) -> None:
        for net, extractor in self.extractors.items():
            self.stats[(net, set_name)].update(extractor(images.float()))

    def add_mi(self, player: str, dists: dict[str, Any], size: int) -> None:
        for name, factor in dists.items():
            mi = factor.mutual_information()
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
    top, diag = model.decoder.latent_names[0], acc.diagnostics
    for batch in batches:
        x = batch["x"]
        acc.embed("data", x)
        rec = sets.reconstruction(x)
        acc.embed("reconstruction", rec)
        acc.recon[0] += _recon_error(x, rec, binary)
        acc.recon[1] += x[0].numel() * len(x)
        with torch.no_grad():
            z, dists = model.encoder.sample(x, model.decoder, gen)
            diag.add_nll("encoder", "data", dists, z)  # its entropy on data: E_pi(x) E_q [-log q(z|x)]
            diag.add_nll("decoder", "data", model.decoder.conditionals(z), {**z, "x": x})  # its training loss
        diag.add_posterior("data", dists[top])
        diag.add_codes("posterior_data", z[top])
        acc.add_mi("encoder", dists, len(x))
        acc.add_codes("posterior", z[top], batch["label"])
        bar.update(len(x))


def _generated_pass(model: TrainedModel, acc: Accumulators, opts: EvalOptions, sets: Sets, gen: torch.Generator,
                    bar: tqdm) -> None:
    top, classifier, diag = model.decoder.latent_names[0], next(iter(acc.extractors.values())), acc.diagnostics
    lengths = opts.chain_lengths
    for start in range(0, opts.n, opts.batch_size):
        num = min(opts.batch_size, opts.n - start)
        images = sets.random_code(num)
        acc.embed("random_code", images)
        chains = sets.limiting_chain(num, on_step=lambda _, k=num: bar.update(k))
        for length, (chain_images, codes) in chains.items():
            acc.embed(chain_key(length), chain_images)
            diag.add_codes(f"chain@{length}", codes[top])
        chain_images, codes = chains[lengths[-1]]
        acc.add_codes("limiting", codes[top], _classify(classifier, chain_images))
        with torch.no_grad():
            z_top = model.prior.sample(num, gen, model.device)
            z, x, dists = model.decoder.sample(z_top, gen)  # a dream: (z, x) ~ pi(z) p(x|z)
            diag.add_nll("decoder", "dreams", dists, {**z, "x": x})  # its entropy on dreams
            q_dists = model.encoder.conditionals(x, z, model.decoder)
            diag.add_nll("encoder", "dreams", q_dists, z)  # the encoder's training loss
            diag.add_posterior("dreams", q_dists[top])
            diag.add_codes("prior", z_top)
            diag.add_codes("prior_resampled", model.prior.sample(num, gen, model.device))  # FD's noise floor
            diag.add_codes("posterior_dreams", model.encoder.sample(x, model.decoder, gen)[0][top])
        acc.add_mi("decoder", dists, num)
        acc.add_codes("prior", z_top, _classify(classifier, sampling.output_image(model.decoder.x_dist(z))))
        bar.update(2 * num)


def _bits_per_dim(model: TrainedModel, opts: EvalOptions) -> dict[str, Any]:
    """Bits/dim of at most n held-out images (eval_split) with the encoder as proposal; the reason when the prior
    has no density (an implicit prior: only samples)."""
    split = model.cfg.data.eval_split
    if not getattr(model.prior, "has_density", False):
        return {"skipped": "the prior has no density (implicit prior): bits/dim needs log pi(z)", "split": split}
    gen = torch.Generator(device=model.device).manual_seed(opts.seed * 1000 + 99)
    batches = (b["x"] for b in _data_batches(model.cfg, split, opts.n, opts.batch_size, model.device))
    return {**bits_per_dim(model.encoder, model.decoder, model.prior, batches, num_samples=opts.iw_samples,
                           generator=gen), "split": split}


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


def _fd_results(acc: Accumulators, lengths: tuple[int, ...]) -> dict[str, Any]:
    """FD per network and set, and the gap (limiting chain minus random code). `limiting_chain` is the longest
    chain; with several lengths, `limiting_chain@L` and `consistency_gap_by_length` hold every one."""
    fd: dict[str, dict[str, float]] = {}
    by_length: dict[str, dict[str, float]] = {}
    for net in acc.extractors:
        values = {s: frechet_distance_stats(acc.stats[(net, "data")], acc.stats[(net, s)]) for s in acc.sets}
        chains = {length: values.pop(chain_key(length)) for length in lengths}
        fd[net] = {"random_code": values["random_code"], "limiting_chain": chains[lengths[-1]],
                   "reconstruction": values["reconstruction"]}
        if len(lengths) > 1:
            fd[net].update({chain_key(length): value for length, value in chains.items()})
        by_length[net] = {str(length): value - values["random_code"] for length, value in chains.items()}
    out: dict[str, Any] = {"fd": fd, "consistency_gap": {net: v["limiting_chain"] - v["random_code"]
                                                          for net, v in fd.items()}}
    if len(lengths) > 1:
        out["consistency_gap_by_length"] = by_length
    return out


def evaluate(opts: EvalOptions) -> dict[str, Any]:
    """Evaluate checkpoint `opts.step` (default: the latest) of `opts.run_dir`; writes
    <run_dir>/eval/step_<step>/ (report.json, report.md, tsne.png), the same files to <run_dir>/eval/ (the most
    recent evaluation, which `symeq compare` reads) and eval/* scalars at that step.

    Raises:
        CheckpointError: the run has no checkpoint, or none of that step (nothing is written).
        InputError: chain steps that are not integers >= 0.
        FileNotFoundError / ValueError: a missing or wrong classifier or Inception weights file (a missing default
            classifier is trained first unless `opts.train_features` is False).
    """
    lengths = opts.chain_lengths
    model = load_trained(opts.run_dir, step=opts.step, ema=opts.ema)
    if opts.prior is not None:
        model = with_prior(model, opts.prior)
    extractors, fid_skipped = load_extractors(opts, model.cfg, model.device)
    ref_split = _reference_split(model.cfg)
    top = model.decoder.latent_names[0]
    diagnostics = Diagnostics(top, model.decoder.top_family, math.prod(model.decoder.latent_shapes[top]))
    acc = Accumulators(extractors, opts.tsne_points, lengths, diagnostics)
    sets, gen = Sets(model, opts.seed, lengths), torch.Generator(device=model.device).manual_seed(opts.seed)
    ref_n = min(opts.n, load_manifest(model.cfg.data.shards)["splits"][ref_split]["num_samples"])
    total = ref_n + opts.n * (lengths[-1] + 2)
    with tqdm(total=total, desc="eval", unit="img", disable=not opts.progress, dynamic_ncols=True) as bar:
        batches = _data_batches(model.cfg, ref_split, opts.n, opts.batch_size, model.device)
        _data_pass(model, acc, batches, sets, gen, bar)
        _generated_pass(model, acc, opts, sets, gen, bar)
    out_dir = opts.run_dir / "eval" / (f"step_{model.step:08d}" + (f"-prior-{opts.prior.name}" if opts.prior else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    tsne_image = _tsne(acc, out_dir / "tsne.png", opts.seed)
    classes = class_report(model, opts, out_dir)
    segmentation = segmentation_report(model, opts, out_dir)
    results = {
        "run_dir": str(opts.run_dir), "step": model.step, "ema_weights": model.ema, "seed": opts.seed, "n": opts.n,
        "chain_steps": lengths[-1], "chain_lengths": list(lengths), "game": model.cfg.game.kind,
        "model": model.cfg.model.kind, "prior": getattr(model.prior, "source", model.cfg.prior.kind),
        "reference": {"split": ref_split, "n": ref_n, "note": "held-out split" if ref_split ==
                      model.cfg.data.eval_split else "training split (held-out split has < 5,000 images)"},
        **_fd_results(acc, lengths), "fid_skipped": fid_skipped,
        "fd_networks": {name: e.info() if hasattr(e, "info") else {} for name, e in extractors.items()},
        "mi": acc.mi_table(), "diagnostics": diagnostics.table(),
        "reconstruction_error": {"metric": "pixel error rate (mode image)" if model.cfg.data.binarize_threshold
                                 is not None else "mean squared error (mean image)",
                                 "value": acc.recon[0] / max(acc.recon[1], 1)},
        "probe": _probe(model, opts, torch.Generator(device=model.device).manual_seed(opts.seed)),
        "class_accuracy": classes,
        "segmentation": segmentation,
        "bits_per_dim": _bits_per_dim(model, opts),
        "figures": {"tsne": "tsne.png"} if tsne_image is not None else {},
    }
    for section in (classes, segmentation):
        if section is not None:
            results["figures"].update(section.pop("figures"))
    write_report(out_dir, results)
    if opts.prior is None:  # another prior's report stays beside the run's own
        _mirror(out_dir, opts.run_dir / "eval")
        _log_tensorboard(opts.run_dir, results, tsne_image)
    return results


def _mirror(step_dir: Path, eval_dir: Path) -> None:
    """Copy a step's report files to <run_dir>/eval/ (each by atomic rename): the most recent evaluation."""
    for name in ("report.json", "report.md", "tsne.png", "classes.png", "tsne_classes.png", "style_transfer.png",
                 "segmentation_rows.png"):
        source, tmp = step_dir / name, eval_dir / f".{name}.tmp"
        if source.is_file():
            shutil.copyfile(source, tmp)
            os.replace(tmp, eval_dir / name)
        else:
            (eval_dir / name).unlink(missing_ok=True)  # no stale figure of another step beside this report


def _log_tensorboard(run_dir: Path, results: dict[str, Any], tsne_image: np.ndarray | None) -> None:
    from symeq_dist.runtime.monitor import Monitor

    monitor = Monitor(run_dir, enabled=True)
    step = results["step"]
    scalars = {f"eval/{net}/{s}": v for net, values in results["fd"].items() for s, v in values.items()}
    scalars.update({f"eval/{net}/gap": v for net, v in results["consistency_gap"].items()})
    by_length = results.get("consistency_gap_by_length", {})
    scalars.update({f"eval/{net}/gap@{length}": v for net, gaps in by_length.items() for length, v in gaps.items()})
    diagnostics = results["diagnostics"]
    for player, factors in diagnostics["joint_nll"].items():
        scalars.update({f"eval/nll/{player}/{name}_{where}": row[where] for name, row in factors.items()
                        for where in ("data", "dreams", "gap") if where in row})
    scalars.update({f"eval/codes/{name}/fd_to_prior": row["fd_to_prior"] for name, row in
                    diagnostics["codes"].items() if isinstance(row, dict) and "fd_to_prior" in row})
    if results["probe"] is not None:
        scalars["eval/probe_accuracy"] = results["probe"]["accuracy"]
    if results.get("class_accuracy") is not None:
        key = "attribute_accuracy" if "attribute_accuracy" in results["class_accuracy"] else "accuracy"
        scalars[f"eval/{key}"] = results["class_accuracy"][key]
    if results.get("segmentation") is not None:
        scalars.update({f"eval/segmentation/{key}": results["segmentation"][key]
                        for key in ("miou", "pixel_accuracy", "cycle_miou", "cycle_pixel_accuracy")})
    scalars["eval/reconstruction_error"] = results["reconstruction_error"]["value"]
    bpd = results["bits_per_dim"]
    scalars.update({f"eval/{key}": bpd[key] for key in ("elbo_bpd", "iw_bpd") if bpd.get(key) is not None})
    for player, factors in results["mi"].items():
        for name, row in factors.items():
            scalars[f"eval/{player}/mi/{name}_mean"] = row["mean"]
            scalars[f"eval/{player}/mi/{name}_active"] = row["active"]
    monitor.scalars(scalars, step)
    if tsne_image is not None:
        monitor.image_hwc("eval/tsne", tsne_image, step)
    monitor.close()
