"""The `symeq` command line: argparse front-ends only (`main.py`, `shards.py`, `eval.py`); the work is `api`."""

from symeq_dist.cli.main import main

__all__ = ["main"]
