# ddbench — every target creates .venv from pyproject.toml on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU machines here install this torch from local disk; on a GPU machine override it,
# e.g. `make test TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
RESULTS ?= results/runs
REPORTS ?= reports

.PHONY: venv test bench report clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

test: venv
	$(BIN)/python -m pytest -q

# The main job on the embedded default (scikit-learn's digits): every registered method,
# ipc 1 and 10, ConvNet, 3 seeds, the quick standard protocol; then the report.
BENCH_GRID := --dataset digits --methods all --ipc 1,10 --eval-archs convnet --seeds 0,1,2 --protocol standard --quick

bench: venv
	$(BIN)/ddbench run $(BENCH_GRID) --results $(RESULTS)/bench --resume
	$(BIN)/ddbench report --results $(RESULTS)/bench --out $(REPORTS)

report: venv
	$(BIN)/ddbench report --results $(RESULTS)/bench --out $(REPORTS)

clean:
	rm -rf $(VENV) .pytest_cache
