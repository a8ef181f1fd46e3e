# Two commands on a fresh Debian machine:
#   make demo   - install everything, start a local Ray head, submit the pipeline on Fashion-MNIST
#   make test   - install everything, run the tests on a real local Ray
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= $(CURDIR)/runs/demo
CONFIG ?= configs/demo.yaml
export RAY_AUTH_MODE ?= disabled
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo test bench ray-up ray-down clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $@

ray-up: setup
	bash scripts/ray_head.sh start

ray-down:
	bash scripts/ray_head.sh stop

demo: setup ray-up
	bash scripts/submit.sh python jobs/full_pipeline.py --config $(CONFIG) --run-dir $(RUN_DIR)

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/ingest.py --out bench-out/ingest.json
	$(PY) benchmarks/tokenizer.py --out bench-out/tokenizer.json

clean:
	rm -rf runs bench-out
