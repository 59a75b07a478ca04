"""The local SLURM cluster itself: gloo rendezvous across two emulated nodes, exit codes, self-requeue."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported at run time by pytest_plugins, so that pytest rewrites its asserts
    from tests.slurm_cluster import Cluster

pytest_plugins = ("tests.slurm_cluster",)
pytestmark = pytest.mark.slurm

ALL_REDUCE = """\
import datetime, json, os, sys
import torch
import torch.distributed as dist

rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
value = torch.tensor([float(rank + 1)])
dist.all_reduce(value)
record = {"rank": rank, "world": world, "sum": value.item(), "node": os.environ["SLURMD_NODENAME"]}
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump(record, f)
dist.destroy_process_group()
"""

# MASTER_ADDR: emulated node names do not resolve, so take the first node's NodeAddr (SLURM.md §5 a).
GLOO_JOB = """\
#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --time=2
set -euo pipefail
first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_ADDR=$(scontrol show node "$first" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
export MASTER_ADDR MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000)) GLOO_SOCKET_IFNAME=lo
srun {python} {script} {out}
"""

SELF_REQUEUE = """\
#!/bin/bash
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --time=2
echo "run ${SLURM_RESTART_COUNT:-0} on $SLURMD_NODENAME"
if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo resumed > "$DONE_FILE"
"""


def write_script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_gloo_all_reduce_across_two_nodes(slurm_cluster: Cluster, tmp_path: Path) -> None:
    write_script(tmp_path / "all_reduce.py", ALL_REDUCE)
    job = write_script(tmp_path / "gloo.sbatch", GLOO_JOB.format(
        python=sys.executable, script=tmp_path / "all_reduce.py", out=tmp_path))
    job_id, code = slurm_cluster.sbatch(job, "--output=gloo-%j.out", wait=True, timeout=150)
    output = (tmp_path / f"gloo-{job_id}.out").read_text()
    assert code == 0, output
    records = sorted((json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)),
                     key=lambda record: record["rank"])
    assert [record["sum"] for record in records] == [3.0, 3.0]
    assert [record["node"] for record in records] == ["n1", "n2"]


def test_exit_code_propagates_through_sbatch_wait(slurm_cluster: Cluster, tmp_path: Path) -> None:
    job = write_script(tmp_path / "fail.sbatch", "#!/bin/bash\n#SBATCH --time=1\nexit 7\n")
    job_id, code = slurm_cluster.sbatch(job, "--output=fail-%j.out", wait=True, timeout=60)
    assert code == 7
    assert slurm_cluster.state(job_id) == "FAILED"
    assert slurm_cluster.exit_code(job_id) == 7


def test_self_requeue_restarts_the_job(slurm_cluster: Cluster, tmp_path: Path) -> None:
    job = write_script(tmp_path / "requeue.sbatch", SELF_REQUEUE)
    done = tmp_path / "done.txt"
    job_id, _ = slurm_cluster.sbatch(job, "--output=requeue-%j.out", extra_env={"DONE_FILE": str(done)})
    deadline = time.monotonic() + 30
    while (info := slurm_cluster.job_info(job_id)).get("Restarts") != "1" or info.get("JobState") != "PENDING":
        assert time.monotonic() < deadline, f"job {job_id} never requeued itself: {info}"
        time.sleep(0.3)
    # The restart would wait cred_expire + 1 s (11 s here); StartTime=now makes it about 1 s.
    slurm_cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    output = tmp_path / f"requeue-{job_id}.out"
    assert slurm_cluster.wait_for(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=30) == "COMPLETED", \
        output.read_text()
    assert done.read_text() == "resumed\n"
    runs = slurm_cluster.jobcomp(job_id)
    assert [run["JobState"] for run in runs] == ["PENDING", "COMPLETED"]
    text = output.read_text()
    assert "run 0 on n" in text and "run 1 on n" in text, text
