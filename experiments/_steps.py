"""The experiments' step runner: one `symeq` command per step, skipped when its output exists, its log and wall
time kept under the output folder (times.json), so a rerun after an interruption continues."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Steps:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
        path = out / "times.json"
        self.times: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    def __call__(self, name: str, done: Path, *argv: str) -> None:
        """Run `symeq ARGV` unless `done` exists; stop the experiment with the log's path if it fails."""
        if done.exists():
            return
        start = time.time()
        with open(self.out / f"{name}.log", "w") as log:
            code = subprocess.run([sys.executable, "-m", "symeq_dist.cli", *argv], cwd=ROOT, env=self.env,
                                  stdout=log, stderr=subprocess.STDOUT).returncode
        if code != 0:
            sys.exit(f"{name} failed ({code}); see {self.out / (name + '.log')}")
        self.times[name] = round(time.time() - start, 1)
        (self.out / "times.json").write_text(json.dumps(self.times, indent=1))
        print(f"{name}: {self.times[name]:.0f} s", flush=True)
