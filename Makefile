# The README's two commands:  `make demo` (the main job) and `make test` (the whole suite).
# Both create the virtual environment and install everything they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
RUN_DIR ?= runs/digits
# no "a new release of pip is available" notice in our output
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test lint bench clean

EXTENSIONS := lightning_saver/formats/_copy_crc.c lightning_saver/formats/_write_regions.c \
	lightning_saver/graph/tf_import/_dnnl_conv.cpp
# oneDNN's headers and library for the optional _dnnl_conv extension (setup.py builds it only where
# /usr/include/dnnl.hpp exists): installed where apt-get exists and we are root, never failing the build
DNNL_INSTALL := if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && [ ! -e /usr/include/dnnl.hpp ]; then \
	export DEBIAN_FRONTEND=noninteractive; apt-get install -y libdnnl-dev || (apt-get update && apt-get install -y libdnnl-dev) || true; fi

$(VENV)/.stamp-base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	touch $@

$(VENV)/.stamp-demo: $(VENV)/.stamp-base pyproject.toml setup.py $(EXTENSIONS) $(CONSTRAINTS)
	$(DNNL_INSTALL)
	$(PIP) install -c $(CONSTRAINTS) -e '.[demo]'
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-base pyproject.toml setup.py $(EXTENSIONS) $(CONSTRAINTS)
	$(DNNL_INSTALL)
	$(PIP) install -c $(CONSTRAINTS) -e '.[test,demo]'
	touch $@ $(VENV)/.stamp-demo

# The main job: LightningCLI fit of configs/digits.yaml under $(RUN_DIR) (TensorBoard logs and, per run,
# lightning_logs/version_N/checkpoints), the files it kept, then a resume from the newest checkpoint for
# two more epochs (max_epochs 8 -> 10). `tensorboard --logdir $(RUN_DIR)` shows the metrics and the graph.
demo: $(VENV)/.stamp-demo
	rm -rf $(RUN_DIR)
	$(VENV)/bin/lightning-saver fit --config configs/digits.yaml --trainer.default_root_dir $(RUN_DIR)
	ls -l $(RUN_DIR)/lightning_logs/version_0/checkpoints
	$(VENV)/bin/lightning-saver fit --config configs/digits.yaml --trainer.default_root_dir $(RUN_DIR) \
		--ckpt_path last --trainer.max_epochs 10
	ls -l $(RUN_DIR)/lightning_logs/version_1/checkpoints

test: $(VENV)/.stamp-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.stamp-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: $(VENV)/.stamp-test
	for f in benchmarks/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) runs build lightning_saver/formats/*.so lightning_saver/graph/tf_import/*.so
