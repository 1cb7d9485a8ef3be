# octconv-exp: `make demo` and `make test` are the two commands a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= outputs/demo
# The Poplar SDK 3.3/3.4 environment: Python 3.8 with torch 2.0.1 / torchvision 0.15.2
# (.ci/sdk-3.4.constraints.txt). SDK_PYTHON: a Python 3.8 (or 3.10) interpreter.
SDK_VENV ?= .venv-sdk
SDK_PY := $(SDK_VENV)/bin/python
SDK_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.8*/bin/python) $(shell command -v python3.8 2>/dev/null))
SDK_CONSTRAINTS := .ci/sdk-3.4.constraints.txt

.PHONY: venv venv-sdk lint test test-newest test-sdk test-fast demo bench bench-e2e mutate mutate-checks clean

# Both venvs build at once (pip waits on downloads and the disk more than on a core).
MAKEFLAGS += -j2

# The venv is (re)built when requirements.txt changes. PIP_INSTALL_FLAGS: more pip install
# options (.ci/run's throwaway venvs: --no-compile).
PIP_INSTALL_FLAGS ?=
# UV: a uv executable (https://docs.astral.sh/uv/) to install with in pip's place: the same
# requirements and constraints resolved to the same packages, unzipped once into uv's cache
# and linked from there (.ci/run uses it: docs/development.md). uv reads no pip configuration
# file: pip's constraints go in UV_CONSTRAINT. Like pip with --no-compile, it compiles nothing.
UV ?=
# $(call install,PYTHON,ARGS): pip install ARGS into PYTHON's venv, by pip or by $(UV).
ifeq ($(strip $(UV)),)
install = $(1) -m pip install --quiet --upgrade pip && $(1) -m pip install --quiet $(PIP_INSTALL_FLAGS) $(2)
else
install = $(UV) pip install --quiet --python $(1) $(2)
endif
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(call install,$(PY),-r requirements.txt)
	touch $@

venv: $(VENV)/.installed

$(SDK_VENV)/.installed: requirements.txt $(SDK_CONSTRAINTS)
	@test -n "$(SDK_PYTHON)" || { echo "make test-sdk needs Python 3.8 or 3.10 (what Poplar SDK 3.3/3.4 run on): set SDK_PYTHON=/path/to/python3.8" >&2; exit 2; }
	test -x $(SDK_PY) || $(SDK_PYTHON) -m venv $(SDK_VENV)
	$(call install,$(SDK_PY),-r requirements.txt -c $(SDK_CONSTRAINTS))
	touch $@

venv-sdk: $(SDK_VENV)/.installed

# Both environments: the newest torch (the whole suite) and the Poplar SDK's torch 2.0.1 on
# Python 3.8 (the tests marked `sdk`: every conv mode end to end on CPU and on the PopTorch
# double, config validation, resume, plus every fast test). Two processes run at a time, one
# per core (most tests wait on a run.py subprocess): in the background the SDK venv is built
# (if it is not yet), then the SDK suite and the newest suite's files in SHARD_B run; in the
# foreground the rest of the newest suite. Logs are printed after; any part failing (the SDK
# venv's build included) fails `make test`.
# One torch/OpenMP thread per test process: the two suites already keep both cores busy, and
# two 2-thread processes on 2 cores made every oneDNN parallel region wait for a descheduled
# thread (docs/development.md). Tests that need more threads set them themselves.
TEST_THREADS ?= 1
TEST_ENV := OMP_NUM_THREADS=$(TEST_THREADS) MKL_NUM_THREADS=$(TEST_THREADS)

# Seconds, and first: the subpackages import only downward (pyproject.toml's import-linter
# contract) and ruff's checks (unused or undefined names, likely bugs). Either failing fails
# `make test` before the suites start.
lint: venv
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .

SDK_LOG ?= .pytest-sdk.log
SHARD_LOG ?= .pytest-shard.log
SHARD_B ?= tests/test_sweeps.py tests/test_models.py tests/test_validation.py tests/test_report.py tests/test_streaming.py tests/test_poprun.py tests/test_hostile_sweeps2.py tests/test_compare.py tests/test_hostile_data.py tests/test_promises.py
# The package's bytecode, compiled once for each Python: where PYTHONDONTWRITEBYTECODE is
# set (this machine sets it), every fresh interpreter (torchrun ranks, joblib's workers, the
# benches' children) would compile the package's modules again (0.2-0.3 s each).
# The SDK venv is built in the background part, beside the first part of the newest suite:
# pip waits on the disk as much as on a core (building both venvs at once took 120 s of
# wall time for 164 s of CPU here), so the suite need not wait for both.
test: venv lint
	@$(PY) -m compileall -q octconv_exp bench > /dev/null
	@( { $(MAKE) --no-print-directory venv-sdk && $(SDK_PY) -m compileall -q octconv_exp bench > /dev/null \
	     && $(TEST_ENV) $(SDK_PY) -m pytest -q -p no:cacheprovider --durations=15 -m "sdk or not slow" tests; } > $(SDK_LOG) 2>&1; echo $$? > $(SDK_LOG).rc; \
	   $(TEST_ENV) $(PY) -m pytest -q -p no:cacheprovider --durations=15 $(SHARD_B) > $(SHARD_LOG) 2>&1; echo $$? > $(SHARD_LOG).rc ) & bg=$$!; \
	echo "== Python $$($(PY) -c 'import platform, torch; print(platform.python_version(), "torch", torch.__version__)'): the whole suite (part 1 of 2)"; \
	$(TEST_ENV) $(PY) -m pytest -q -p no:cacheprovider --durations=15 tests $(addprefix --ignore=,$(SHARD_B)); newest=$$?; \
	wait $$bg; \
	echo "== Python $$($(PY) -c 'import platform, torch; print(platform.python_version(), "torch", torch.__version__)'): the whole suite (part 2 of 2: $(SHARD_B))"; \
	cat $(SHARD_LOG); \
	echo "== Python $$(test -x $(SDK_PY) && $(SDK_PY) -c 'import platform, torch; print(platform.python_version(), "torch", torch.__version__)' 2>/dev/null || echo '3.8/3.10: its venv did not build') (Poplar SDK 3.3/3.4): fast tests and tests marked sdk"; \
	cat $(SDK_LOG); \
	sdk_rc=$$(cat $(SDK_LOG).rc 2>/dev/null || echo 1); shard_rc=$$(cat $(SHARD_LOG).rc 2>/dev/null || echo 1); \
	rm -f $(SDK_LOG) $(SDK_LOG).rc $(SHARD_LOG) $(SHARD_LOG).rc; \
	test $$newest -eq 0 && test $$sdk_rc -eq 0 && test $$shard_rc -eq 0

# The whole suite, slow end-to-end tests included (they are the proof of several features).
test-newest: venv
	$(PY) -m pytest -q tests

test-sdk: venv-sdk
	$(SDK_PY) -m pytest -q -m "sdk or not slow" tests

# Everything but the tests marked slow.
test-fast: venv
	$(PY) -m pytest -q -m "not slow" tests

# A short offline sweep on the synthetic data set: every conv mode at two alphas.
demo: venv
	rm -rf $(DEMO_DIR)
	$(PY) run.py -m experiment=smoke hydra.sweep.dir=$(DEMO_DIR)
	@echo "Demo outputs: $(abspath $(DEMO_DIR))"
	@echo "  summary: $(abspath $(DEMO_DIR))/summary.md (and summary.csv, summary_by_config.csv, pareto.csv)"
	@echo "  plots:   $(abspath $(DEMO_DIR))/accuracy_vs_alpha.png, throughput_vs_alpha.png, accuracy_vs_flops.png, accuracy_vs_throughput.png"
	@echo "  runs:    one directory per job, e.g. $(DEMO_DIR)/conv=octave,alpha=0.25/seed=0/"

# Whole epochs through run.py first (what users run, with the defaults), then single layers,
# steps and the framework's overhead, multi-octave's BatchNorm, speed.malloc on and off, then the
# streaming loader, inference latency (eager torch and ONNX Runtime; Oct-ResNet-50 at
# batch 32 dominates its time), then training steps beside CPU-burning neighbours. The
# CUDA column, on a GPU:
# $(PY) bench/bench_cuda.py (docs/performance.md).
bench: venv
	$(PY) bench/bench_end_to_end.py
	$(PY) bench/bench_octconv.py
	$(PY) bench/bench_batchnorm.py
	$(PY) bench/bench_malloc.py
	$(PY) bench/bench_streaming.py
	$(PY) bench/bench_inference.py
	$(PY) bench/bench_busy.py

bench-e2e: venv
	$(PY) bench/bench_end_to_end.py

# Mutation testing, on demand (not part of `make test` or CI): mutmut changes one thing at a
# time in the core modules (a "mutant": a flipped comparison, a dropped call, another
# constant) and runs the fast tests against each; a mutant they pass on "survived": a bug
# no test notices. It edits the files in place one mutant at a time (restoring each from
# its .bak), so leave the work tree alone while it runs. Reading the result:
# docs/development.md ("Mutation testing"). mutmut is installed into the venv here, not
# listed in requirements.txt. A failing runner exits 1 for mutmut (pytest's 2, a module
# that no longer imports, would count as "survived").
MUTATE_PATHS ?= octconv_exp/training/loop.py,octconv_exp/training/checkpoint.py,octconv_exp/records/outputs.py,octconv_exp/training/runner.py,octconv_exp/data/datasets.py
MUTATE_TESTS ?= tests/test_outputs.py tests/test_data.py tests/test_validation.py tests/test_robustness.py tests/test_ipu.py
# MUTATE_FUNCTIONS: names of top-level functions in those files; only their mutants are tested
# (mutmut_config.py), the others are reported as skipped. Empty: every mutant.
MUTATE_FUNCTIONS ?=
# MUTANT=ID: (re)check that one mutant only.
MUTANT ?=
mutate: venv
	$(PY) -m pip install --quiet 'mutmut>=2.5,<3'
	@# mutmut caches a skipped mutant as skipped: another scope starts from an empty cache.
	@scope='$(MUTATE_PATHS) $(MUTATE_FUNCTIONS)'; test "$$scope" = "$$(cat .mutmut-scope 2>/dev/null)" \
		|| { rm -f .mutmut-cache; printf '%s' "$$scope" > .mutmut-scope; }
	MUTATE_FUNCTIONS='$(MUTATE_FUNCTIONS)' $(PY) -m mutmut run $(MUTANT) --paths-to-mutate '$(MUTATE_PATHS)' --tests-dir tests --simple-output \
		--runner "sh -c '$(abspath $(PY)) -m pytest -x -q -p no:cacheprovider -m \"not slow\" $(MUTATE_TESTS) >/dev/null 2>&1 || exit 1'"; \
	rc=$$?; $(PY) -m mutmut results; test $$((rc & 1)) -eq 0

# The refusals docs/reliability.md promises (a key nothing reads, an argument the optimizer or
# the schedule does not take, a model larger than memory) and a parallel launcher's share of
# the cores per job, against the fast tests that pin them: 162 mutants, 40 to 80 s each on
# 2 busy cores (docs/development.md); MUTATE_FUNCTIONS=name on the command line narrows it.
MUTATE_CHECKS := _refuse_unknown_keys _check_optimizer_arguments _check_scheduler \
	check_model_fits_in_memory check_optimizer_for_device _require_int _is_number _import_target \
	launcher_threads
mutate-checks: MUTATE_PATHS = octconv_exp/config/schema.py,octconv_exp/backends/checks.py,octconv_exp/cli/outcome.py
mutate-checks: MUTATE_FUNCTIONS = $(MUTATE_CHECKS)
mutate-checks: MUTATE_TESTS = tests/test_promises.py \
	--deselect tests/test_promises.py::test_a_bad_value_deep_in_a_large_sweep_is_refused_before_any_job \
	tests/test_robustness.py::test_a_model_that_cannot_fit_in_gpu_memory_is_refused_before_allocating
mutate-checks: mutate

clean:
	rm -rf outputs multirun .pytest_cache
