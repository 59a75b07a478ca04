"""`python -m symeq_dist.cli ...` (torchrun, the launcher, the sbatch scripts)."""

import sys

from symeq_dist.cli.main import main

sys.exit(main())
