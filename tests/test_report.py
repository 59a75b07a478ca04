"""The t-SNE figure, report.json / report.md and the side-by-side comparison of evaluated runs."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from symeq_dist.eval.compare import compare_runs
from symeq_dist.eval.figures import tsne_figure
from symeq_dist.eval.report import write_report


def _codes(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray | None]]:
    rng = np.random.default_rng(seed)
    codes = {"prior": (rng.random((60, 8)) > 0.5).astype(np.float32),
             "posterior": rng.normal(size=(60, 8)),
             "limiting": rng.normal(1.0, 1.0, size=(60, 8))}
    labels: dict[str, np.ndarray | None] = {"prior": None, "posterior": rng.integers(0, 10, 60),
                                            "limiting": rng.integers(0, 10, 60)}
    return codes, labels


def _results(run_dir: str = "/runs/mnist_sym", n: int = 4500, fd_random: float = 12.34567) -> dict[str, Any]:
    return {
        "run_dir": run_dir, "step": 12000, "seed": 0, "n": n, "chain_steps": 1000, "game": "symmetric",
        "fd": {"FD-clf-1a2b3c4d": {"random_code": fd_random, "limiting_chain": 15.5, "reconstruction": 3.25}},
        "fd_networks": {"FD-clf-1a2b3c4d": {"kind": "classifier", "sha256": "1a2b3c4d" * 8, "valid_accuracy": 0.985}},
        "fid_skipped": "no Inception weights file (pass --inception-weights)",
        "consistency_gap": {"FD-clf-1a2b3c4d": 15.5 - fd_random},
        "mi": {"encoder": {"z0": {"mean": 0.2, "active": 25, "dims": 30}, "z1": {"mean": 0.05, "active": 40,
                                                                                   "dims": 100}},
               "decoder": {"z1": {"mean": 0.1, "active": 60, "dims": 100}}},
        "reconstruction_error": {"metric": "pixel error rate (mode image)", "value": 0.0321},
        "probe": {"accuracy": 0.9123, "latent": "z0", "num_train": 4500, "num_test": 500},
        "figures": {"tsne": "tsne.png"},
    }


def test_tsne_figure_writes_png_and_returns_rgb(tmp_path: Path) -> None:
    codes, labels = _codes()
    image = tsne_figure(codes, labels, tmp_path / "fig" / "tsne.png", seed=0, perplexity=5.0, title="codes")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    with Image.open(tmp_path / "fig" / "tsne.png") as png:
        assert png.size == (image.shape[1], image.shape[0])
    assert image.std() > 0  # something was drawn


def test_tsne_figure_is_deterministic_under_the_seed(tmp_path: Path) -> None:
    codes, labels = _codes()
    kwargs: dict[str, Any] = {"seed": 3, "perplexity": 5.0, "max_points_per_set": 50}
    first = tsne_figure(codes, labels, tmp_path / "a.png", **kwargs)
    second = tsne_figure(copy.deepcopy(codes), copy.deepcopy(labels), tmp_path / "b.png", **kwargs)
    np.testing.assert_array_equal(first, second)


def test_tsne_figure_rejects_bad_input(tmp_path: Path) -> None:
    codes, labels = _codes()
    with pytest.raises(ValueError, match="perplexity"):
        tsne_figure(codes, labels, tmp_path / "x.png", perplexity=500.0)
    with pytest.raises(ValueError, match="same width"):
        tsne_figure({**codes, "prior": np.zeros((60, 3))}, labels, tmp_path / "x.png", perplexity=5.0)
    with pytest.raises(ValueError, match="one per code"):
        tsne_figure(codes, {**labels, "posterior": np.zeros(7)}, tmp_path / "x.png", perplexity=5.0)


def test_write_report_writes_json_and_markdown(tmp_path: Path) -> None:
    results = _results()
    json_path, md_path = write_report(tmp_path / "eval", results)
    assert json.loads(json_path.read_text()) == results
    assert not list((tmp_path / "eval").glob("*.tmp"))
    md = md_path.read_text()
    for expected in ("12.3457", "15.5000", "3.2500", "3.1543", "FD-clf-1a2b3c4d", "checkpoint step: 12000",
                     "FID skipped: no Inception weights", "0.9123", "0.0321", "| encoder | z1 | 0.0500 | 40 | 100 |",
                     "(tsne.png)", "n (samples per set): 4500"):
        assert expected in md, expected


def _write_run(root: Path, name: str, results: dict[str, Any]) -> Path:
    run_dir = root / name
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "eval" / "report.json").write_text(json.dumps(results))
    return run_dir


def test_compare_runs_table_and_plot(tmp_path: Path) -> None:
    sym = _write_run(tmp_path, "run_sym", _results(fd_random=12.34567))
    elbo_results = _results(fd_random=8.5, n=1000)
    elbo_results["game"] = "elbo"
    elbo = _write_run(tmp_path, "run_elbo", elbo_results)
    table = compare_runs([sym, elbo], tmp_path / "cmp" / "table.md", tmp_path / "cmp" / "fd.png")
    for expected in ("run_sym (symmetric)", "run_elbo (elbo)", "12.3457", "8.5000", "0.9123",
                     "| active latents encoder/z1 | 40/100 | 40/100 |", "differ in n"):
        assert expected in table, expected
    assert "differ in feature networks" not in table
    assert (tmp_path / "cmp" / "table.md").read_text() == table
    with Image.open(tmp_path / "cmp" / "fd.png") as png:
        assert png.size[0] > 100


def test_compare_runs_warns_about_different_networks(tmp_path: Path) -> None:
    other = _results()
    other["fd"] = {"FID": other["fd"].pop("FD-clf-1a2b3c4d")}
    runs = [_write_run(tmp_path, "a", _results()), _write_run(tmp_path, "b", other)]
    assert "differ in feature networks" in compare_runs(runs, None, None)
    with pytest.raises(ValueError, match="share no feature network"):
        compare_runs(runs, None, tmp_path / "fd.png")


def test_compare_runs_missing_report_names_the_command(tmp_path: Path) -> None:
    (tmp_path / "never_evaluated").mkdir()
    with pytest.raises(FileNotFoundError, match="symeq eval"):
        compare_runs([tmp_path / "never_evaluated"], None, None)


def _with_lengths(results: dict[str, Any], step: int, chain: dict[int, float]) -> dict[str, Any]:
    """`results` at training step `step`, with the limiting chain measured after each length of `chain`."""
    out = copy.deepcopy(results)
    net = next(iter(out["fd"]))
    lengths = sorted(chain)
    out.update(step=step, chain_steps=lengths[-1], chain_lengths=lengths)
    out["fd"][net].update({f"limiting_chain@{k}": v for k, v in chain.items()}, limiting_chain=chain[lengths[-1]])
    random = out["fd"][net]["random_code"]
    out["consistency_gap"] = {net: chain[lengths[-1]] - random}
    out["consistency_gap_by_length"] = {net: {str(k): v - random for k, v in chain.items()}}
    return out


def _diagnostics() -> dict[str, Any]:
    return {"joint_nll": {"encoder": {"z": {"dims": 16, "dreams": 1.25, "data": 0.5, "gap": 0.75}},
                          "decoder": {"x": {"dims": 784, "dreams": 0.0625, "data": 0.125, "gap": -0.0625}}},
            "posterior": {"latent": "z", "family": "gaussian", "prior_variance": 1.0,
                          "data": {"variance": 0.03125, "entropy": -0.5}, "dreams": {"variance": 0.0625,
                                                                                      "entropy": 0.25}},
            "codes": {"latent": "z", "dims": 16, "prior": {"mean": 0.0, "variance": 1.0},
                      "chain@1000": {"mean": 0.375, "variance": 2.5, "fd_to_prior": 7.75}}}


def test_report_shows_every_chain_length_and_the_diagnostics(tmp_path: Path) -> None:
    results = _with_lengths(_results(), 12000, {0: 40.0, 10: 30.0, 1000: 15.5})
    results["diagnostics"] = _diagnostics()
    _, md_path = write_report(tmp_path, results)
    md = md_path.read_text()
    for expected in ("limiting-chain steps: 0, 10, 1000", "| limiting_chain@10 | 30.0000 |",
                     "| gap after 0 chain steps | 27.6543 |", "## Consistency diagnostics",
                     "| encoder | z | 16 | 1.2500 | 0.5000 | 0.7500 |", "| data | 0.0312 | -0.5000 |",
                     "| chain@1000 | 0.3750 | 2.5000 | 7.7500 |", "prior variance 1.0000"):
        assert expected in md, expected


def _write_steps(root: Path, name: str, game: str, points: dict[int, dict[int, float]]) -> Path:
    """A run directory with one eval/step_<N>/report.json per training step (and eval/report.json = the last)."""
    run_dir = root / name
    for step, chain in points.items():
        results = _with_lengths(_results(run_dir=str(run_dir)), step, chain)
        results["game"] = game
        write_report(run_dir / "eval" / f"step_{step:08d}", results)
        write_report(run_dir / "eval", results)
    return run_dir


def test_compare_runs_draws_fd_and_gap_against_the_training_step(tmp_path: Path) -> None:
    sym = _write_steps(tmp_path, "sym", "symmetric", {30000: {0: 20.0, 1000: 25.0}, 3000: {0: 40.0, 1000: 90.0},
                                                       10000: {0: 30.0, 1000: 50.0}})
    elbo = _write_steps(tmp_path, "elbo", "elbo", {3000: {0: 35.0, 1000: 300.0}, 30000: {0: 20.0, 1000: 400.0}})
    text = compare_runs([sym, elbo], tmp_path / "cmp.md", tmp_path / "cmp.png", out_curves=tmp_path / "curves.png")
    assert "## Across training" in text and "| limiting_chain@0 |" not in text
    header = next(line for line in text.splitlines() if line.startswith("| run | step |"))
    assert header == "| run | step | n | random code | chain 0 | chain 1000 | gap 0 | gap 1000 |"
    for row in ("| sym (symmetric) | 3000 | 4500 | 12.3 | 40.0 | 90.0 | 27.7 | 77.7 |",
                "| sym (symmetric) | 30000 | 4500 | 12.3 | 20.0 | 25.0 | 7.7 | 12.7 |",
                "| elbo (elbo) | 30000 | 4500 | 12.3 | 20.0 | 400.0 | 7.7 | 387.7 |"):
        assert row in text, row
    assert text.index("| sym (symmetric) | 3000 |") < text.index("| sym (symmetric) | 10000 |")  # step order
    # side by side: each run's most recent evaluation (sym's step 10000 was written last)
    assert "| step | 10000 | 30000 |" in text and "FD-clf-1a2b3c4d limiting_chain@0 | 30.0000 | 20.0000 |" in text
    with Image.open(tmp_path / "curves.png") as png:
        assert png.size[0] > 600 and np.asarray(png.convert("L")).std() > 0


def test_compare_runs_without_several_steps_draws_no_curves(tmp_path: Path) -> None:
    old = _write_run(tmp_path, "old", _results())  # a report from before step directories and chain lists
    one = _write_steps(tmp_path, "one", "elbo", {3000: {0: 35.0, 1000: 300.0}})
    text = compare_runs([old, one], None, None, out_curves=tmp_path / "curves.png")
    assert "Across training" not in text and not (tmp_path / "curves.png").exists()
    assert "| FD-clf-1a2b3c4d limiting_chain@1000 | 15.5000 | 300.0000 |" in text  # the old report's single length
