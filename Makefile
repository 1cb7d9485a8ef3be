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

# A short offline experiment on the synthetic data set.
demo: venv
	rm -rf $(DEMO_DIR)
	$(PY) run.py dataset=synthetic conv=multi-octave alpha=0.25 trainer.epochs=2 \
		dataset.train_size=5000 dataset.test_size=1000 hydra.run.dir=$(DEMO_DIR)
	@echo "Demo outputs: $(abspath $(DEMO_DIR)) (metrics.json, epochs.csv, model.pt, run.log, .hydra/)"

bench: venv
	$(PY) bench/bench_octconv.py

clean:
	rm -rf outputs multirun .pytest_cache
