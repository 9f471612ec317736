# make course : set up .venv, run every notebook in smoke mode (outputs and figures/ regenerated)
# make test   : set up .venv, unit tests + nbval over every notebook
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
export DPO_COURSE_MODE ?= smoke
export PYTHONHASHSEED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: course test unit nbval setup bench tokenizer clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Without CUDA, take the CPU wheel first: an unpinned torch pulls gigabytes of CUDA packages.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	# bench (trl) too, so that the TRL parity test runs in CI rather than being skipped.
	$(PY) -m pip install -q -e ".[course,bench]"
	touch $(STAMP)

course: $(STAMP)
	mkdir -p figures
	for nb in $(NOTEBOOKS); do \
	  echo "== $$nb"; \
	  $(PY) -m jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.timeout=900 --ExecutePreprocessor.kernel_name=python3 "$$nb" \
	    || exit 1; \
	done
	@ls figures

test: unit nbval

unit: $(STAMP)
	$(PY) -m pytest tests/ -q

nbval: $(STAMP)
	# pytest exits 5 when it collects nothing (no notebooks yet): that is a pass.
	$(PY) -m pytest -q --nbval --nbval-current-env \
	  --nbval-sanitize-with tests/nbval_sanitize.cfg notebooks/ ; \
	  rc=$$?; if [ $$rc -eq 5 ]; then echo "no notebooks to check"; exit 0; fi; exit $$rc

# make bench BENCH_ARGS="--runs 1 --runs-124m 1 --no-write" for a quick check.
bench: $(STAMP)
	$(PY) benchmarks/bench_vs_trl.py $(BENCH_ARGS)

tokenizer: $(STAMP)
	$(PY) scripts/train_tokenizer.py

clean:
	rm -rf $(VENV) .pytest_cache
