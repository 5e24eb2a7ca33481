# UniMatch: the two set-up commands of the README live here.
#   make demo  - build .venv, run the whole path on a small synthetic dataset, serve on 127.0.0.1:8000
#   make test  - build .venv the same way, lint (ruff, mypy), run the whole test suite
PYTHON ?= python3.11
# the port `make demo` serves on: `make demo PORT=8001`
PORT ?= 8000
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-port test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in the train extra (a CPU wheel; an unpinned torch pulls CUDA builds).
	$(BIN)/python -m pip install --quiet -e '.[serve,train,dev]'
	@touch $(STAMP)

venv: $(STAMP)

# demo-port first (make builds prerequisites left to right): a busy port fails before any install.
demo: demo-port $(STAMP)
	$(BIN)/python scripts/demo.py --port $(PORT)

demo-port:
	@$(PYTHON) scripts/port_free.py $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy contracts model index_builder service unimatch experiments loadtests

test: $(STAMP) lint
	@# pytest exits 5 when it collected no test: that is a failure too.
	$(BIN)/python -m pytest -q; rc=$$?; [ $$rc -ne 5 ] || echo 'make test: pytest collected no tests'; exit $$rc

clean:
	rm -rf demo .pytest_cache .ruff_cache .mypy_cache
