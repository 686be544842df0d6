# autoprune: the two commands are `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
# Test processes: two keep both cores of a small machine busy (most tests run one thread or wait
# on a subprocess); each test file stays in one process, so its fixtures are built once.
TEST_WORKERS ?= 2

.PHONY: run test lint bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: the pinned CPU build; any looser request would pull a CUDA build.
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/autoprune compare experiments/compare.yaml --apply pruned_model.pt --apply-epochs 2

test: $(STAMP)
	$(PY) -m pytest -q -x -n $(TEST_WORKERS) --dist loadfile --durations=15

lint: $(STAMP)
	$(PY) tests/layering.py
	$(VENV)/bin/ruff check autoprune envs agents tests experiments
	$(VENV)/bin/ruff format --check autoprune envs agents tests experiments
	$(VENV)/bin/mypy autoprune envs agents

bench: $(STAMP)
	$(VENV)/bin/autoprune bench experiments/benchmark.yaml --resume

clean:
	rm -rf $(VENV) build *.egg-info
