"""Per-node process launcher for symeq-dist (standalone or under SLURM); see launch.py."""
