# A real instruct model under DPO on a CPU (issue 25): notebook 08, SmolLM2-135M-Instruct.
# make real     : run notebook 08 uncapped in smoke mode (2 CPU threads) into build/real/ (figures
#                 in build/real/figures/; notebooks/ is not written), then check the gains its
#                 on-policy run must reach: mean true reward up by >= 0.1 and a win rate against
#                 the reference >= 0.75 (build/real/figures/nb08_results.json). make test runs
#                 the notebook with its training steps capped (DPO_COURSE_REHEARSAL=1).
# make onpolicy : rebuild dpo_minimal/data/smollm2_onpolicy_*.jsonl and their recipe
#                 (scripts/make_onpolicy_pairs.py: SmolLM2's own answers, judged by the true
#                 reward; several minutes on 2 cores).
.PHONY: real onpolicy

REAL_NOTEBOOK := notebooks/08_dpo_real_instruct_model.ipynb

# A training cell took over 900 s (EXECUTE's limit per cell) on 2 cores shared with other jobs.
real: $(STAMP)
	rm -rf build/real && mkdir -p build/real/figures
	DPO_COURSE_REHEARSAL=0 DPO_COURSE_FIGURES=$(CURDIR)/build/real/figures \
	  $(EXECUTE) --ExecutePreprocessor.timeout=3600 --output-dir build/real $(REAL_NOTEBOOK)
	$(PY) -c 'import json, sys; r = json.load(open("build/real/figures/nb08_results.json")); \
	  rise, win = r["rise"]["on-policy pairs"], r["win_rate"]["on-policy pairs"]; \
	  print(f"on-policy DPO: true reward {rise:+.3f}, win rate {win:.3f}"); \
	  sys.exit(0 if rise >= 0.1 and win >= 0.75 else "below the targets (+0.1, 0.75)")'

onpolicy: $(STAMP)
	$(PY) scripts/make_onpolicy_pairs.py
