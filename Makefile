# Everything a user runs goes through these targets; each one creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# cpu -> tensorflow-cpu, gpu -> tensorflow[and-cuda]; detected from nvidia-smi unless set.
TF_EXTRA ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
# More extras for every target, comma-separated: EXTRAS=ray gives `extract --engine ray`.
EXTRAS ?=
comma := ,
INSTALL_EXTRAS := $(TF_EXTRA)$(if $(EXTRAS),$(comma)$(EXTRAS))

DATA ?= data/demo
FEATURES ?= data/features
WEIGHTS ?= imagenet
EXTRACT_ARGS ?=
# The demo: digits upscaled to 64 px, random weights, small enough for ~3 minutes on 2 cores.
DEMO_SIZE ?= 64
REDUCED ?= data/reduced
PROBE ?= data/probe
RUNS ?= data/runs
REDUCE_ARGS ?=
PROBE_ARGS ?=
TRAIN_ARGS ?=
# The demo's heads: a four-run sweep on 64 PCA components.
DEMO_SWEEP ?= data/demo-sweep.toml
# The benchmark writes bench.json + bench.md to BENCH_OUT; BENCH_ARGS=--quick for a one-minute run, BENCH_DATA=DIR for your images.
BENCH_OUT ?= bench-out
BENCH_ARGS ?=
BENCH_DATA ?=
# BENCH_RESULTS=pipeline/bench/RESULTS.md also writes the tables into that page's bench-table block.
BENCH_RESULTS ?=

.PHONY: install data extract reduce probe train demo bench lint test test-all clean

install: $(VENV)/.installed-$(INSTALL_EXTRAS)

# The TensorFlow package of each flavour (the first of a set of extras), and the other flavour of a set.
TF_PACKAGE.cpu := tensorflow-cpu
TF_PACKAGE.gpu := tensorflow
other_flavour = $(if $(filter gpu,$(firstword $(subst $(comma), ,$(1)))),cpu,gpu)

# One stamp per set of extras: asking for another set installs it. The test extra pulls in ray.
# tensorflow and tensorflow-cpu write the same files, so switching flavour first removes both (the one
# asked for may hold the other's files) and forgets the other flavour's stamps; then pip installs one.
$(VENV)/.installed-%: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	if $(BIN)/pip show --quiet $(TF_PACKAGE.$(call other_flavour,$*)) 2>/dev/null; then \
		$(BIN)/pip uninstall --quiet --yes $(TF_PACKAGE.cpu) $(TF_PACKAGE.gpu); fi
	rm -f $(VENV)/.installed-$(call other_flavour,$*) $(VENV)/.installed-$(call other_flavour,$*),*
	$(BIN)/pip install --quiet -e ".[$*]"
	touch $@

data: install
	$(BIN)/pipeline demo-data $(DATA) --size $(DEMO_SIZE)

extract: install
	$(BIN)/pipeline extract $(DATA) --out $(FEATURES) --weights $(WEIGHTS) $(EXTRACT_ARGS)

reduce: install
	$(BIN)/pipeline reduce $(FEATURES) --out $(REDUCED) $(REDUCE_ARGS)

probe: install
	$(BIN)/pipeline probe $(REDUCED) --out $(PROBE) $(PROBE_ARGS)

train: install
	$(BIN)/pipeline train $(REDUCED) --runs $(RUNS) $(TRAIN_ARGS)
	$(BIN)/pipeline runs $(RUNS)

demo: install
	@echo "demo: digits at $(DEMO_SIZE) px, random weights, 2 CPU cores take about 3 minutes"
	$(BIN)/pipeline demo-data $(DATA) --size $(DEMO_SIZE)
	$(BIN)/pipeline extract $(DATA) --out $(FEATURES) --weights random --image-size $(DEMO_SIZE)
	$(BIN)/pipeline inspect $(FEATURES) --verify
	$(BIN)/pipeline reduce $(FEATURES) --out $(REDUCED) --components 64
	$(BIN)/pipeline probe $(REDUCED) --out $(PROBE)
	$(BIN)/pipeline train $(REDUCED) --runs $(RUNS) --sweep $(DEMO_SWEEP)
	$(BIN)/pipeline runs $(RUNS)

bench: $(VENV)/.installed-$(INSTALL_EXTRAS),ray
	$(BIN)/pipeline bench --out $(BENCH_OUT) $(if $(BENCH_DATA),--data $(BENCH_DATA)) $(if $(BENCH_RESULTS),--results $(BENCH_RESULTS)) $(BENCH_ARGS)

# Test files run in TEST_WORKERS processes (pytest-xdist), each file whole in one of them so that
# module fixtures (a local Ray, a built lineage) start once. Two overlap TensorFlow's single-threaded
# start-up and graph building even on 2 cores; TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2

# ruff: the layout (format --check) and the rules in pyproject.toml; make test runs it first.
lint: $(VENV)/.installed-$(INSTALL_EXTRAS),test
	$(BIN)/ruff format --check pipeline tests
	$(BIN)/ruff check pipeline tests

test: lint
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

test-all: lint
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile -m ""

clean:
	rm -rf $(VENV) data/demo data/features data/reduced data/probe data/runs $(BENCH_OUT)
