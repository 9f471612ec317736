# SmolLM2-135M-Instruct, the real instruct model a CPU can train (course.load_smollm2, issue 25).
# make onpolicy : rebuild dpo_minimal/data/smollm2_onpolicy_*.jsonl and their recipe
#                 (scripts/make_onpolicy_pairs.py: SmolLM2's own answers, judged by the task
#                 world's true reward; about 45 min on 2 busy cores).
.PHONY: onpolicy

onpolicy: $(STAMP)
	$(PY) scripts/make_onpolicy_pairs.py
