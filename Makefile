# Two entry points for users: `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch + torchvision pinned per architecture (docs/install.md);
# override e.g. `make install TORCH_SPEC="torch torchvision"` elsewhere.
ARCH := $(shell uname -m)
ifeq ($(ARCH),aarch64)
TORCH_SPEC ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
endif
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all bench bench-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/fsae demo --out runs/demo

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m "slow or not slow"

bench: install
	$(PY) -m benchmarks.run

bench-gpu: install  # one GPU, under 5 minutes; writes benchmarks/results_gpu.md
	$(PY) -m benchmarks.gpu

clean:
	rm -rf $(VENV) runs build *.egg-info
