# Two set-up commands for a fresh machine: `make demo` and `make test`.
# Both create .venv when missing, install dpolab into it, and are fast when already installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The install is redone when pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml 2>/dev/null | cut -d' ' -f1)

.PHONY: demo test install lint clean

# The main job: the quickstart (docs/quickstart.md), offline, minutes on 2 CPU cores.
demo: $(STAMP)
	$(BIN)/dpolab quickstart --out runs/quickstart --overwrite

test: $(STAMP)
	# The report test renders HTML in Debian's chromium; CI installs it when missing.
	if [ "$$CI" = "true" ] && ! command -v chromium >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi
	$(BIN)/ruff check src tests benchmarks experiments
	# The layers of docs/architecture.md, as import-linter contracts (pyproject.toml)
	$(BIN)/lint-imports
	# Two workers, one file each at a time (a file's module fixtures are built once), one torch thread
	# each: about half the time of one worker on 2 cores. `pytest` alone still runs in one process.
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile

install: $(STAMP)

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU build of PyTorch first where no GPU is present; otherwise pip picks the CUDA build.
	if ! nvidia-smi -L >/dev/null 2>&1; then $(BIN)/python -m pip install --quiet torch==2.13.0; fi
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks experiments
	$(BIN)/ruff format --check src tests benchmarks experiments

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
