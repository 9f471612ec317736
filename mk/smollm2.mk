# SmolLM2-135M-Instruct, the real instruct model a CPU can train (course.load_smollm2, issue 25).
# make real     : run notebook 08 uncapped in smoke mode (2 CPU threads) into build/real/ (figures
#                 in build/real/figures/; notebooks/ is not written), then check the gains its
#                 on-policy run must reach: mean true reward up by >= 0.1, a win rate against
#                 the reference >= 0.75, and more than the shipped pairs' run gains
#                 (scripts/check_real.py on build/real/figures/nb08_results.json). About 5 min
#                 on 2 idle cores. make test runs the notebook with its training steps capped
#                 (DPO_COURSE_REHEARSAL=1).
# make onpolicy : rebuild dpo_minimal/data/smollm2_onpolicy_*.jsonl and their recipe
#                 (scripts/make_onpolicy_pairs.py: SmolLM2's own answers, judged by the task
#                 world's true reward; about 45 min on 2 busy cores).
.PHONY: real onpolicy

REAL_NOTEBOOK := notebooks/08_dpo_real_instruct_model.ipynb

real: $(STAMP)
	rm -rf build/real && mkdir -p build/real/figures
	DPO_COURSE_REHEARSAL=0 DPO_COURSE_FIGURES=$(CURDIR)/build/real/figures \
	  $(EXECUTE) --output-dir build/real $(REAL_NOTEBOOK)
	$(PY) scripts/check_real.py build/real/figures/nb08_results.json

onpolicy: $(STAMP)
	$(PY) scripts/make_onpolicy_pairs.py
