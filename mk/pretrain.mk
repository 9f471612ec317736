# make task-data : rewrite dpo_minimal/data/task_*.jsonl from the task world (byte for byte)
# make pretrain  : retrain the shipped tiny GPT-2 and tiny phi on task_sft.jsonl, one after the
#                  other (about 6 and 4 min of CPU; PRETRAIN_ARCH=phi for one of them)
.PHONY: task-data pretrain

PRETRAIN_ARCH ?= gpt2 phi
# Each arch's command, as its RECIPE.md records it.
PRETRAIN_ARGS_gpt2 = --steps 1500
PRETRAIN_ARGS_phi = --arch phi --steps 1000 --samples 4

task-data: $(STAMP)
	$(PY) scripts/make_task_data.py

pretrain: task-data
	set -e; for arch in $(PRETRAIN_ARCH); do \
	  case $$arch in gpt2) args="$(PRETRAIN_ARGS_gpt2)";; phi) args="$(PRETRAIN_ARGS_phi)";; \
	  *) echo "PRETRAIN_ARCH: unknown arch $$arch (gpt2, phi)"; exit 2;; esac; \
	  $(PY) scripts/pretrain.py $$args; done
