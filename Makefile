# The two set-up commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The dev install pins torch so pip never pulls a newer, multi-GB build. Where pip's configured indexes hold
# a CPU wheel of it (this project's machines), that is what it takes. From PyPI on Linux x86_64 the same pin
# is the CUDA build (about 0.5 GB plus 3 GB of NVIDIA packages): for a CPU-only demo name PyTorch's CPU index,
# `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu` (pip's --index-url). On a machine with its
# own torch, run `make TORCH_SPEC= demo` to keep it.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: demo test test-slow test-all reproduce venv clean-demo

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The time stamps in the trained files (ss_training_*_at, modelspec.date) are SOURCE_DATE_EPOCH's when it
# is set (reproducible-builds.org), so the demo's outputs are byte-identical to the md5s in dvc.lock. A fixed
# value, not the commit time: dvc.lock records the LoRA's md5, and committing dvc.lock changes the commit
# time. 1980-01-01 (Nix's default), not 0: zip-based tools refuse times before 1980.
DEMO_SOURCE_DATE_EPOCH := 315532800

# data/raw is tracked by DVC (data/raw.dvc), so queued experiments and other clones get it from DVC.
demo: venv
	$(BIN)/kiln demo-data
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc add --quiet data/raw
	SOURCE_DATE_EPOCH=$(DEMO_SOURCE_DATE_EPOCH) PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# pytest exits 5 when it collected no test: that is a failure, never a pass.
PYTEST = $(BIN)/python -m pytest --durations=15
define run_pytest
	@$(PYTEST) $(1) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc
endef

# The default suite: everything but the tests marked slow (the dvc graph, multi-process runs).
test: venv
	$(call run_pytest,)

# Only the slow tests: real `dvc repro` / `dvc exp run`, 2-process accelerate launches, kill-and-resume
# subprocesses. CI runs `make test` then `make test-slow`.
test-slow: venv
	$(call run_pytest,-m slow)

# Both at once.
test-all: venv
	KILN_SLOW=1 $(PYTEST) $(PYTEST_ARGS)

# CI-reproduced experiment: run the committed graph from this checkout (demo data, tiny-sd15, CPU), then
# compare every output hash with the committed dvc.lock and metrics.json with the committed baseline,
# and write reports/experiment.md (metrics with deltas, loss curve, samples). Fails if anything differs.
reproduce: demo
	$(BIN)/kiln report --out reports/experiment.md

clean-demo:
	rm -rf data/scan data/bucket
