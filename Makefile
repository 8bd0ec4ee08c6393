# The two commands: `make demo` (the main job) and `make test`. Each creates or reuses .venv and installs itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deepres-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-slow clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
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

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
