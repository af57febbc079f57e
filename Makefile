# ddbench — every target creates .venv from pyproject.toml on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU machines here install this torch from local disk; on a GPU machine override it,
# e.g. `make test TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
RESULTS ?= results/runs
REPORTS ?= reports

.PHONY: venv venv-dev test clean

# Two layers: what ddbench needs to run (`make bench` and every suite), and on top of it the test and Ray extras
# (`make test`, `make bench-parallel_quick`): pytest, Ray and kornia would cost `make bench` about 35 s (installing
# them 29 s, compiling them the rest) for nothing it uses.
venv: $(VENV)/.installed
venv-dev: $(VENV)/.installed-dev

# pip byte-compiles what it installs one file at a time (torch and torchvision: 75 s with it, 43 s without, on our
# 2-core machine); compileall does the whole venv on every core (29 s), and writes the .pyc files even where
# PYTHONDONTWRITEBYTECODE is set, as on our machines: without them every process (the CLI, each cell, each test
# worker) would compile torch again on import. A few files of the installed packages are not valid for this Python (torch's py312 test helpers):
# compileall exits 1 for them, which is not an error of the install (hence `|| true`). The installed packages' own
# test folders (pandas/tests, scipy's, torch's testing/_internal, …: a fifth of the files) are never imported here,
# and are left out: 10 to 20 s less on our 2-core machine.
COMPILE := $(BIN)/python -m compileall -q -j 0 -x 'site-packages/.+/(tests?|testing/_internal)/'
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile $(TORCH_SPEC)
	$(BIN)/pip install --quiet --no-compile -e .
	$(COMPILE) $(VENV)/lib bench methods > /dev/null 2>&1 || true
	touch $@

# Rebuilt whenever the first layer is (its stamp is newer); compileall skips the files already compiled.
$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet --no-compile -e '.[dev]'
	$(COMPILE) $(VENV)/lib > /dev/null 2>&1 || true
	touch $@

# The tests in parallel (pytest-xdist), one worker per core, each with one torch thread: two 2-thread torch
# processes on 2 cores slow each other many times over. 5.6 min on 2 cores, 11 min in one process.
PYTEST_WORKERS ?= auto
test: venv-dev
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS)

# Where the datasets live (e.g. `make bench-mnist DATA_ROOT=../shared/data/mnist`); default: $DDBENCH_DATA or ./data.
DATA_ROOT ?= $(or $(DDBENCH_DATA),data)
# Full recipes on a machine with an NVIDIA GPU, the reduced (quick, flagged in every record) ones elsewhere.
HAS_GPU := $(shell command -v nvidia-smi 2>/dev/null)
QUICK ?= $(if $(HAS_GPU),,--quick)
# MNIST's full grid (ipc 1/10/50) takes GPU-hours; on a CPU, bench-mnist runs the CPU-sized `mnist_cpu` suite.
MNIST_SUITE ?= $(if $(HAS_GPU),mnist,mnist_cpu)
BASELINE ?= results/baselines/quick-cpu

# CPU runs put one cell per core side by side, each with one torch thread (`ddbench run --jobs`): distillation's small
# networks barely use a second thread. On a GPU, cells run one per GPU.
JOBS ?= $(if $(HAS_GPU),1,$(shell nproc 2>/dev/null || echo 1))

SUITE_TARGETS := bench-cifar10 bench-cifar100 bench-tiny bench-imagenet bench-cross_arch bench-efficiency bench-efficiency_imagenet bench-efficiency_cpu bench-ablation_k bench-parallel
.PHONY: bench bench-mnist bench-parallel_quick $(SUITE_TARGETS) report regress

# The main job on the embedded default (scikit-learn's digits): the `quick` suite (every built-in method, ipc 1 and 10,
# ConvNet, 3 seeds, the standard protocol, reduced CPU recipes), then its report.
bench: venv
	$(BIN)/ddbench run --suite quick --results $(RESULTS)/quick --resume --jobs $(JOBS)
	$(BIN)/ddbench report --suite quick --results $(RESULTS)/quick --out $(REPORTS)

# Any other suite: `make bench-<suite>` runs bench/suites/<suite>.yaml on the data under DATA_ROOT, then its report.
$(SUITE_TARGETS): bench-%: venv
	$(BIN)/ddbench run --suite $* $(QUICK) --data-root $(DATA_ROOT) --results $(RESULTS)/$* --resume --jobs $(JOBS)
	$(BIN)/ddbench report --suite $* --results $(RESULTS)/$* --out $(REPORTS)

bench-mnist: venv
	$(BIN)/ddbench run --suite $(MNIST_SUITE) $(QUICK) --data-root $(DATA_ROOT) --results $(RESULTS)/$(MNIST_SUITE) --resume --jobs $(JOBS)
	$(BIN)/ddbench report --suite $(MNIST_SUITE) --results $(RESULTS)/$(MNIST_SUITE) --out $(REPORTS)

# APM's merged-subgroups figure in quick form on digits, every subgroup a task of the Ray executor (a local Ray head on
# 127.0.0.1 unless RAY_ADDRESS names a running cluster).
RAY_ADDRESS ?= auto
bench-parallel_quick: venv-dev
	$(BIN)/ddbench run --suite parallel_quick --executor ray --ray-address $(RAY_ADDRESS) --results $(RESULTS)/parallel_quick --resume
	$(BIN)/ddbench report --suite parallel_quick --results $(RESULTS)/parallel_quick --out $(REPORTS)

report: venv
	@for dir in $(RESULTS)/*/; do name=$$(basename $$dir); \
	  if [ -d $$dir/records ]; then $(BIN)/ddbench report --results $$dir --out $(REPORTS) || exit $$?; fi; done

# The quick suite from scratch (its own empty expert cache, so the experts' cost is always in it, as in the
# baseline; evaluation seeds trained one at a time — the reference computation — so that no machine-dependent
# engine choice moves a number), cells side by side with one torch thread each (as the baseline was made), compared
# with the committed CPU baseline: exit 1 when a cell got worse. Memory and time get looser tolerances than `ddbench
# compare`'s defaults (15 %, 2×): CI's machine is not the baseline's. So does accuracy (3 points, not 2): in an
# earlier session the same code and seeds gave APM at digits ipc 1 60.0 on one 2-core machine and 56.9 on another
# (an earlier quick recipe, not re-measured since: CPU kernels round differently, and APM's adversarial updates
# amplify it); 2 standard errors still apply.
# CI checks the ipc-1 half of the grid (`full` included: it has no ipc) to keep its run short; `make regress
# REGRESS_ONLY=` checks the whole grid against the whole baseline (about 9 min on a 2-core AMD EPYC with JOBS=2).
REGRESS_TOLERANCES ?= --acc-tol 3 --memory-rel-tol 0.15 --time-rel-tol 1.0
REGRESS_ONLY ?= --only ipc=1
regress: venv
	rm -rf $(RESULTS)/regress $(RESULTS)/regress-cache
	$(BIN)/ddbench run --suite quick $(REGRESS_ONLY) --results $(RESULTS)/regress --cache-dir $(RESULTS)/regress-cache --batch-seeds off --jobs $(JOBS)
	$(BIN)/ddbench compare $(BASELINE) $(RESULTS)/regress $(REGRESS_TOLERANCES) $(REGRESS_ONLY)

clean:
	rm -rf $(VENV) .pytest_cache
