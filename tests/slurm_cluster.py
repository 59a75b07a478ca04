"""The real local SLURM cluster for `slurm`-marked tests: a session fixture around slurm/cluster/up.sh and down.sh.

Use it from a test module with `pytest_plugins = ("tests.slurm_cluster",)` and a `slurm_cluster` argument.
Two emulated nodes (n1, n2) on this machine, partitions `low` (default) and `high` (SLURM.md). Test code only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UP = ROOT / "slurm" / "cluster" / "up.sh"
DOWN = ROOT / "slurm" / "cluster" / "down.sh"
NUM_NODES = 2
REQUIRED = ("slurmctld", "slurmd", "sbatch", "munged")
UNIX_SOCKET_MAX = 108  # sun_path, including the terminating NUL
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                          "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})
_KEY_VALUE = re.compile(r"(\w+)=(.*?)(?= \w+=|\s*$)")  # jobcomp and `scontrol -o` lines: KEY=VALUE separated by spaces


def slurm_available() -> str | None:
    """None when this machine can run the local cluster, else the reason to skip (naming the fix)."""
    missing = [cmd for cmd in REQUIRED if shutil.which(cmd) is None]
    if missing:
        return f"SLURM not installed ({', '.join(missing)} not on PATH): run `make slurm` as root"
    if os.geteuid() != 0:
        return "the local SLURM cluster runs its daemons as root (SlurmUser=root): run the slurm tests as root"
    return None


def parse_key_values(line: str) -> dict[str, str]:
    """`KEY=VALUE KEY=VALUE ...` (a jobcomp line, `scontrol show job -o`) as a dict; values may hold spaces."""
    return dict(_KEY_VALUE.findall(line.strip()))


@dataclass(frozen=True)
class Cluster:
    """A running local cluster: `env` carries SLURM_CONF; every method runs a SLURM client with it."""

    root: Path
    env: dict[str, str]

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command (`squeue`, `scontrol`, `srun`, ...) against this cluster."""
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def sbatch(self, script: Path, *args: str, wait: bool = False, extra_env: dict[str, str] | None = None,
               timeout: float = 300) -> tuple[int, int | None]:
        """Submit `script` with the sbatch options `args`, from the script's folder (the job's working directory).

        Returns:
            (job id, sbatch's exit code when `wait` (the job's exit code under `--wait`), else None).
        """
        cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *args, str(script)]
        env = {**self.env, **(extra_env or {})}
        proc = subprocess.run(cmd, env=env, cwd=script.parent, capture_output=True, text=True, timeout=timeout)
        first = proc.stdout.strip().split("\n", 1)[0]
        match = re.fullmatch(r"(\d+)(;\S+)?", first)
        if match is None or (not wait and proc.returncode != 0):
            raise RuntimeError(f"sbatch failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
        return int(match.group(1)), (proc.returncode if wait else None)

    def job_info(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Restarts, Reason, ExitCode, ...); {} once purged."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        return parse_key_values(proc.stdout) if proc.returncode == 0 else {}

    def state(self, job_id: int) -> str:
        """The job's state from squeue, or its last jobcomp `JobState=` once purged; "UNKNOWN" if neither."""
        proc = self.run("squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T", check=False)
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.split()[0]
        runs = self.jobcomp(job_id)
        return runs[-1].get("JobState", "UNKNOWN") if runs else "UNKNOWN"

    def wait_for(self, job_id: int, states: set[str], timeout: float = 60) -> str:
        """Poll every 0.3 s until the job is in one of `states`; returns that state, raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state(job_id)
            if state in states:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout} s (wanted {sorted(states)})")
            time.sleep(0.3)

    def signal(self, job_id: int, sig: str, batch: bool = False) -> None:
        """`scancel --signal=SIG`: to the job's steps, or with `batch` to the batch shell only."""
        self.run("scancel", f"--signal={sig}", *(["--batch"] if batch else []), str(job_id))

    def requeue(self, job_id: int) -> None:
        """`scontrol requeue` (the job needs `--requeue`); it restarts after cred_expire + 1 s (about 11 s)."""
        self.run("scontrol", "requeue", str(job_id))

    def jobcomp(self, job_id: int) -> list[dict[str, str]]:
        """Every jobcomp record of the job, one per run (a requeued run is logged as JobState=PENDING)."""
        path = self.root / "log" / "jobcomp.txt"
        if not path.exists():
            return []
        records = (parse_key_values(line) for line in path.read_text().splitlines() if line.strip())
        return [record for record in records if record.get("JobId") == str(job_id)]

    def exit_code(self, job_id: int) -> int | None:
        """The exit code of the job's final run from jobcomp (`ExitCode=code:signal`; 128 + signal if killed).

        None while the job has no final record (still queued, running, or requeued).
        """
        runs = self.jobcomp(job_id)
        if not runs or runs[-1].get("JobState") not in FINAL_STATES:
            return None
        code, _, sig = runs[-1].get("ExitCode", "0:0").partition(":")
        return 128 + int(sig) if sig and int(sig) else int(code)

    def logs(self, lines: int = 40) -> str:
        """The tail of every daemon log, for failure messages."""
        return _log_tails(self.root, lines)


def _log_tails(root: Path, lines: int = 40) -> str:
    parts = []
    for path in sorted((root / "log").glob("*")):
        if path.is_file() and path.name != "jobcomp.txt":
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"===== {path.name}\n" + "\n".join(tail))
    return "\n".join(parts)


def _client_env(conf: Path) -> dict[str, str]:
    """os.environ without inherited job variables (pytest may itself run inside a SLURM job), plus SLURM_CONF."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}
    return {**env, "SLURM_CONF": str(conf)}


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A 2-node cluster for the session, in a short /tmp root (socket paths); its logs end up in a pytest tmp dir."""
    reason = slurm_available()
    if reason is not None:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="sq", dir="/tmp"))
    if len(str(root / "munge" / "munge.socket.2")) >= UNIX_SOCKET_MAX:
        pytest.fail(f"{root} is too long for a UNIX socket path ({UNIX_SOCKET_MAX} bytes)")
    try:
        up = subprocess.run(["bash", str(UP), str(root), str(NUM_NODES)], capture_output=True, text=True,
                            timeout=90)
        if up.returncode != 0:
            pytest.fail(f"up.sh failed ({up.returncode}):\n{up.stdout}{up.stderr}\n{_log_tails(root)}",
                        pytrace=False)
        yield Cluster(root=root, env=_client_env(root / "etc" / "slurm.conf"))
    finally:
        down = subprocess.run(["bash", str(DOWN), str(root)], capture_output=True, text=True, timeout=120)
        if (root / "log").is_dir():
            shutil.copytree(root / "log", tmp_path_factory.mktemp("slurm_logs"), dirs_exist_ok=True)
        if down.returncode == 0:
            shutil.rmtree(root, ignore_errors=True)
        else:
            pytest.fail(f"down.sh failed ({down.returncode}), left {root}:\n{down.stdout}{down.stderr}")
