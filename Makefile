# octconv-exp: `make demo` and `make test` are the two commands a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= outputs/demo

.PHONY: venv test test-fast demo bench clean

# The venv is (re)built when requirements.txt changes.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.installed

# The whole suite, slow end-to-end tests included (they are the proof of several features).
test: venv
	$(PY) -m pytest -q tests

# Everything but the tests marked slow.
test-fast: venv
	$(PY) -m pytest -q -m "not slow" tests

# A short offline sweep on the synthetic data set: every conv mode at two alphas.
demo: venv
	rm -rf $(DEMO_DIR)
	$(PY) run.py -m experiment=smoke hydra.sweep.dir=$(DEMO_DIR)
	@echo "Demo outputs: $(abspath $(DEMO_DIR))"
	@echo "  summary: $(abspath $(DEMO_DIR))/summary.md (and summary.csv, summary_by_config.csv)"
	@echo "  plots:   $(abspath $(DEMO_DIR))/accuracy_vs_alpha.png, throughput_vs_alpha.png, accuracy_vs_flops.png"
	@echo "  runs:    one directory per job, e.g. $(DEMO_DIR)/conv=octave,alpha=0.25/seed=0/"

bench: venv
	$(PY) bench/bench_octconv.py

clean:
	rm -rf outputs multirun .pytest_cache
