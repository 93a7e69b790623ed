# Everything a user runs goes through these targets; each one creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# cpu -> tensorflow-cpu, gpu -> tensorflow[and-cuda]; detected from nvidia-smi unless set.
TF_EXTRA ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)

DATA ?= data/demo
FEATURES ?= data/features
WEIGHTS ?= imagenet
EXTRACT_ARGS ?=
# The demo: digits upscaled to 64 px, random weights, small enough for ~3 minutes on 2 cores.
DEMO_SIZE ?= 64

.PHONY: install data extract demo test test-all clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[$(TF_EXTRA),test]"
	touch $@

data: install
	$(BIN)/pipeline demo-data $(DATA) --size $(DEMO_SIZE)

extract: install
	$(BIN)/pipeline extract $(DATA) --out $(FEATURES) --weights $(WEIGHTS) $(EXTRACT_ARGS)

demo: install
	@echo "demo: digits at $(DEMO_SIZE) px, random weights, 2 CPU cores take about 3 minutes"
	$(BIN)/pipeline demo-data $(DATA) --size $(DEMO_SIZE)
	$(BIN)/pipeline extract $(DATA) --out $(FEATURES) --weights random --image-size $(DEMO_SIZE)
	$(BIN)/pipeline inspect $(FEATURES) --verify

test: install
	$(BIN)/pytest -q

test-all: install
	$(BIN)/pytest -q -m ""

clean:
	rm -rf $(VENV) data/demo data/features
