"""Write the task world's data files, byte for byte the same on every rebuild.

    python scripts/make_task_data.py          # (re)write dpo_minimal/data/task_*.jsonl
    python scripts/make_task_data.py --check  # exit 1 if a shipped file differs from a rebuild

The generators live in dpo_minimal/course/task.py; the data card is dpo_minimal/data/README.md.
"""

import argparse
import json
import sys
from pathlib import Path

from dpo_minimal.course import task

DATA = Path(task.__file__).resolve().parents[1] / "data"
SEED = 0
SFT_PER_FACT = 12
TRAIN_PAIRS, TEST_PAIRS = 600, 100


def files() -> dict[str, list[dict]]:
    """File name -> rows, all from fixed seeds."""
    train, heldout = task.split_facts(SEED)
    return {
        "task_sft.jsonl": task.sft_corpus(SFT_PER_FACT, seed=SEED),
        "task_prefs_train.jsonl": task.preference_pairs(train, TRAIN_PAIRS, SEED + 1, "train"),
        "task_prefs_test.jsonl": task.preference_pairs(heldout, TEST_PAIRS, SEED + 2, "test"),
        "task_heldout.jsonl": task.heldout_prompts(SEED),
    }


def text(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=True) + "\n" for row in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped files")
    check = parser.parse_args().check
    stale = []
    for name, rows in files().items():
        path = DATA / name
        if check:
            if not path.exists() or path.read_text(encoding="utf-8") != text(rows):
                stale.append(name)
            continue
        path.write_text(text(rows), encoding="utf-8")
        print(f"wrote {path.name}: {len(rows)} rows, {path.stat().st_size / 1024:.0f} KiB")
    if stale:
        print("differ from a rebuild: " + ", ".join(stale))
    elif check:
        print("task data files are up to date")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
