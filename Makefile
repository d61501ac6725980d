# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
# Both create the virtual environment on first use.
PYTHON ?= python3.10
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo local-demo test bench throughput peers install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/serve_end_to_end.py

local-demo: $(STAMP)
	$(PY) examples/mnist_end_to_end.py

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_convnet.py

# Server throughput with 1 and 2 worker processes (one per core) on the ConvNet.
throughput: $(STAMP)
	$(PY) benchmarks/throughput.py

# Orion (Python 3.11 only) and TenSEAL in their own venvs, then one side-by-side table.
peers: $(STAMP)
	bash benchmarks/peers/setup.sh
	$(PY) benchmarks/peers/run.py --networks convnet,lola,lenet5 --frameworks h33,orion,tenseal --images 8 --repeat 3

clean:
	rm -rf $(VENV) artifacts .pytest_cache
