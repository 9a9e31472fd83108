# visiontune: `make demo` trains on an offline demo dataset; `make test` runs the test suite.
# Both create ./.venv and install visiontune with its pinned dependencies on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo shell test browser test-slow fashion-mnist gpu-check gpu-check-inputs bench-speed bench-memory bench-playbook bench-beyond bench-serve bench-large bench-distributed clean

# pip's wheel cache is off: torch alone is 5.5 GB in the venv, and a second copy in ~/.cache can fill a small disk.
export PIP_NO_CACHE_DIR := 1

$(STAMP): pyproject.toml
	@$(PYTHON) -c "import shutil,sys; free=shutil.disk_usage('.').free/2**30; sys.exit(0) if free >= 8 else sys.exit(f'visiontune install needs about 8 GB free here (torch is 5.5 GB); {free:.1f} GB free: free some disk and rerun')"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Export scikit-learn's digits as PNG folders (once), then train with the default plan.
demo: $(STAMP)
	@test -d data/digits || $(BIN)/visiontune demo-data digits data/digits
	$(BIN)/visiontune train data/digits
	@echo "next: source $(VENV)/bin/activate (or: make shell), then: visiontune --help"

# An interactive shell with the venv activated, so `visiontune ...` works as the README types it.
shell: $(STAMP)
	@echo "visiontune is on PATH in this shell; exit to leave it"
	@VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(BIN)):$$PATH $${SHELL:-bash} -i

# One worker process per core (at most 4), a test file per worker at a time, longest files first (tests/conftest.py;
# --no-loadscope-reorder: xdist would otherwise hand out the files with most tests first, leaving the one-test
# gpu-check file, the longest, for last);
# the 15 slowest tests are printed so that a regression shows. A skip fails here (VISIONTUNE_REQUIRE_*).
test: $(STAMP) browser fashion-mnist
	VISIONTUNE_REQUIRE_BROWSER=1 VISIONTUNE_REQUIRE_DATA=1 $(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder --durations=15

# Headless Chromium for the report/page tests (Debian packages; needs root or sudo).
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)

# Benchmark-style tests (need Fashion-MNIST: `make fashion-mnist`).
test-slow: $(STAMP) fashion-mnist
	$(BIN)/python -m pytest -q -m slow

# Benchmarks (bench/README.md): fastai is installed for them only.
$(VENV)/.bench: $(STAMP)
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

bench-speed: $(VENV)/.bench fashion-mnist
	$(BIN)/python bench/fmnist_speed.py

bench-playbook: $(STAMP) fashion-mnist
	$(BIN)/python bench/playbook.py
	$(BIN)/python bench/compile_check.py

bench-beyond: $(STAMP) fashion-mnist
	$(BIN)/python bench/beyond_labels.py ssl
	$(BIN)/python bench/beyond_labels.py adapt

bench-large: $(STAMP)
	$(BIN)/python bench/large_data.py

bench-serve: $(STAMP) fashion-mnist
	$(BIN)/python bench/serve_load.py

bench-distributed: $(STAMP) fashion-mnist
	$(BIN)/python bench/distributed.py --repeats 2

bench-memory: $(VENV)/.bench
	$(BIN)/python bench/cache_memory.py

# The GPU check (bench/gpu_check.py): inputs prepared here (Fashion-MNIST + the wheels a GPU machine lacks, <= 60 MB),
# then `make gpu-check` on the GPU machine with its own Python (PyTorch, torchvision, timm preinstalled; no venv, no network).
GPU_INPUTS ?= bench/.gpu-inputs
GPU_PYTHON_VERSION ?= 3.12
gpu-check-inputs: $(STAMP) fashion-mnist
	$(BIN)/python bench/gpu_check.py --prepare-inputs $(GPU_INPUTS) --python-version $(GPU_PYTHON_VERSION)

gpu-check:
	$(PYTHON) bench/gpu_check.py --inputs $(GPU_INPUTS)

fashion-mnist:
	@test -d /usr/share/datasets/fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)

clean:
	rm -rf $(VENV) runs data .pytest_cache
