"""Regenerate the course's byte-level BPE tokenizer, byte for byte.

    python scripts/train_tokenizer.py          # rewrite dpo_minimal/tokenizer/tokenizer.json
    python scripts/train_tokenizer.py --check  # exit 1 if the shipped file differs

The corpus is the course's own text: the shipped preference files, read in a fixed order. The
BPE trainer is deterministic for a fixed corpus and settings, so the output is reproducible.
"""

import argparse
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "dpo_minimal" / "data"
OUT = ROOT / "dpo_minimal" / "tokenizer" / "tokenizer.json"
CORPUS_FILES = ["truthy_mini_train.jsonl", "truthy_mini_test.jsonl", "conversations_mini.jsonl"]
VOCAB_SIZE = 4096
EOS = "<|endoftext|>"


def _strings(value):
    """Every string inside a row, messages included, in a fixed order."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for key in sorted(value):
            yield from _strings(value[key])


def corpus() -> list[str]:
    lines = []
    for name in CORPUS_FILES:
        for raw in (DATA / name).read_text(encoding="utf-8").splitlines():
            row = json.loads(raw)
            lines.extend(_strings({k: row[k] for k in ("prompt", "chosen", "rejected")}))
    return lines


def build() -> str:
    tok = Tokenizer(models.BPE())
    # GPT-2's scheme: bytes mapped to printable characters, a space kept as part of the next word.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok.to_str(pretty=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped file")
    text = build()
    if parser.parse_args().check:
        same = OUT.read_text(encoding="utf-8") == text
        print("tokenizer.json is up to date" if same else "tokenizer.json differs from a rebuild")
        return 0 if same else 1
    OUT.write_text(text, encoding="utf-8")
    vocab = Tokenizer.from_str(text).get_vocab_size()
    print(f"wrote {OUT.relative_to(ROOT)}: vocabulary {vocab}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
