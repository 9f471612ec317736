# make task-data : rewrite dpo_minimal/data/task_*.jsonl from the task world (byte for byte)
# make pretrain  : retrain the shipped tiny GPT-2 on task_sft.jsonl (2 CPU cores, ~15 min)
.PHONY: task-data pretrain

task-data: $(STAMP)
	$(PY) scripts/make_task_data.py

pretrain: task-data
	$(PY) scripts/pretrain.py
