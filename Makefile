# The two commands: `make demo` (the main job) and `make test`. Each creates or reuses .venv and installs itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deepres-installed
# Two workers on the two cores (pytest-xdist): about 1.5x faster than one process.
PYTEST_ARGS ?= -n 2

.PHONY: install demo test test-slow gpu-check clean

# pyproject.toml states the supported ranges; constraints.txt pins the tested versions these commands install.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST is looked for in $$DEEPRES_DATA, ../shared/data, then Debian's dataset-fashion-mnist (installed when
# missing and we are root); otherwise the trainer downloads it.
FASHION_DIRS = $(DEEPRES_DATA) $(DEEPRES_DATA)/fashion-mnist ../shared/data/fashion-mnist /usr/share/datasets/fashion-mnist

demo: $(STAMP)
	@dir=""; for d in $(FASHION_DIRS); do \
	  if [ -f "$$d/train-images-idx3-ubyte.gz" ]; then dir="$$d"; break; fi; done; \
	if [ -z "$$dir" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist && dir=/usr/share/datasets/fashion-mnist; fi; \
	echo "Fashion-MNIST: $${dir:-not found locally, downloading into ./data}"; \
	$(PY) -m deepres train --recipe demo --run-dir runs/demo --resume auto $${dir:+--set data.data_dir=$$dir}

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# The GPU evidence pass (deepres.benchmarks.gpu_pass): on the GPU machine with its own python3 (PyTorch there, no
# registry, nothing installed), from the source tree:  make gpu-check ARGS="--data .gpu/cifar10-jpeg.tar.gz --out $$OUT"
# Here, `make gpu-check ARGS=--smoke` runs the whole pass on the CPU at tiny sizes with the project's .venv.
GPU_PYTHON ?= $(shell test -x $(PY) && echo $(PY) || echo python3)
gpu-check:
	PYTHONPATH=src $(GPU_PYTHON) -m deepres.benchmarks.gpu_pass $(ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
