# Two commands: `make demo` and `make test`. Both set up .venv from scratch when it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# CPU machines pin the local torch wheel; GPU users install their CUDA torch first (README).
CONSTRAINTS ?= constraints-cpu.txt
export DS_ACCELERATOR ?= cpu

.PHONY: setup demo test test-slow shards bench lint clean fmnist

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	$(BIN)/python -m symeq_dist.runtime.ops   # DeepSpeed's CPU comm op, built once where every entry point looks
	-@$(MAKE) -s fmnist
	-@$(MAKE) -s slurm
	touch $(STAMP)

# Fashion-MNIST ships as a Debian package; best effort (tests that need it skip with the command to run).
fmnist:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
		|| echo "note: could not install dataset-fashion-mnist (needed only for configs/fmnist_ladder.yaml)"; fi

# The local SLURM cluster of the `slurm` tests (slurm/cluster/, SLURM.md); `slurm` is also a folder, hence PHONY.
.PHONY: slurm
SLURM_PKGS := slurmctld slurmd slurm-client munge
slurm:
	@PATH="$$PATH:/usr/sbin:/sbin"; if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
		&& command -v sbatch >/dev/null && command -v munged >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "slurm: run as root: apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(SLURM_PKGS)"; \
		exit 1; fi; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SLURM_PKGS) >/dev/null

demo: $(STAMP)
	$(BIN)/symeq demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/step_overhead.py

lint: $(STAMP)
	$(BIN)/ruff check symeq_dist launcher tests benchmarks

clean:
	rm -rf $(VENV) .cache runs data_shards/*/
