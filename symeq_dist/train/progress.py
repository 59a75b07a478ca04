"""What rank 0 tells the person watching: a progress bar on a terminal, a plain log line every logging interval
elsewhere (SLURM output files, pipes, `monitor.progress=false`), and a summary at the end of a run.

Both say the same: step, each engine's loss with its terms (the ELBO's joint loss: reconstruction and KLs),
a mutual-information summary per player, images per second and the time left. Must not import models or data.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("symeq")


def status(values: dict[str, float], engines: list[str]) -> str:
    """'decoder 176.64 encoder 20.48 | MI enc 0.81 dec 0.151' (ELBO: 'joint 197.6 (x 180.1, kl 17.5)')."""
    parts = []
    for engine in engines:
        loss = values.get(f"train/{engine}/loss")
        if loss is None:
            continue
        kls = [v for k, v in values.items() if k.startswith(f"train/{engine}/kl/")]
        terms = f" (x {values[f'train/{engine}/nll/x']:.1f}, kl {sum(kls):.1f})" if kls else ""
        parts.append(f"{engine} {loss:.2f}{terms}")
    mi = []
    for player, short in (("encoder", "enc"), ("decoder", "dec")):
        means = [v for k, v in values.items() if k.startswith(f"train/{player}/mi/") and k.endswith("_mean")]
        if means:
            mi.append(f"{short} {sum(means) / len(means):.3g}")
    return " ".join(parts) + (f" | MI {' '.join(mi)}" if mi else "")


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """Rank 0's view of the loop (a no-op elsewhere); a context manager so logs never glue to the bar."""

    def __init__(self, *, enabled: bool, bar: bool, total: int, initial: int, engines: list[str]) -> None:
        self.enabled, self.total, self.engines = enabled, total, engines
        self.bar = (tqdm(total=total, initial=initial, desc="train", unit="it", dynamic_ncols=True)
                    if enabled and bar and sys.stderr.isatty() else None)
        self._redirect = logging_redirect_tqdm() if self.bar is not None else None

    def __enter__(self) -> Progress:
        if self._redirect is not None:
            self._redirect.__enter__()  # log records go through tqdm.write: above the bar, never glued to it
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._redirect is not None:
            self._redirect.__exit__(*exc)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def report(self, step: int, values: dict[str, float]) -> None:
        """After a logging interval: the bar's postfix, or one log line when there is no bar."""
        if not self.enabled:
            return
        text = status(values, self.engines)
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            return
        rate = values.get("perf/samples_per_s", 0.0)
        eta = values.get("perf/step_time_s", 0.0) * (self.total - step)
        log.info("step %d/%d | %s | %.0f img/s | ETA %s", step, self.total, text, rate, _duration(eta))

    def summary(self, *, step: int, values: dict[str, float], run_dir: Path, checkpoint: Path | None) -> None:
        """The end of a run: what it reached and where everything is."""
        if not self.enabled:
            return
        samples = sorted((run_dir / "samples").glob("*.png"))
        last = sorted({p.name.rsplit("_", 1)[1] for p in samples})[-1:] if samples else []
        grids = [str(p) for p in samples if last and p.name.endswith(last[0])]
        log.info("done: step %d of %d | %s", step, self.total, status(values, self.engines) or "no scalars logged")
        log.info("checkpoint: %s", checkpoint if checkpoint is not None else "none written")
        if grids:
            log.info("sample grids: %s", ", ".join(grids))
        log.info("TensorBoard: tensorboard --logdir %s", run_dir / "tb")
