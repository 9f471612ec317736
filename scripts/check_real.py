"""Check notebook 08's measured gains (make real): the on-policy run must reach the targets.

    python scripts/check_real.py build/real/figures/nb08_results.json

Targets: on-policy DPO raises the mean true reward on the held-out questions by at least 0.1,
wins at least 75% of the questions it does not tie with the reference, and gains more than the
run on the shipped (off-policy) pairs. Prints what was measured either way; exit status 1 below.
"""

import json
import sys

MIN_RISE, MIN_WIN_RATE = 0.1, 0.75


def failures(results: dict) -> list[str]:
    """What falls short of the targets, as sentences (empty: all met)."""
    rise, win = results["rise"], results["win_rate"]
    out = []
    if rise["on-policy pairs"] < MIN_RISE:
        out.append(f"on-policy true reward rose {rise['on-policy pairs']:+.3f} (< +{MIN_RISE})")
    if win["on-policy pairs"] < MIN_WIN_RATE:
        out.append(f"on-policy win rate {win['on-policy pairs']:.3f} (< {MIN_WIN_RATE})")
    if rise["on-policy pairs"] <= rise["shipped pairs"]:
        out.append("the on-policy run gained no more than the shipped pairs' run")
    return out


def main(path: str) -> int:
    results = json.loads(open(path, encoding="utf-8").read())
    for name in ("shipped pairs", "on-policy pairs"):
        print(f"DPO on {name}: mean true reward {results['rise'][name]:+.3f}, "
              f"win rate {results['win_rate'][name]:.3f}")
    print(f"implicit reward accuracy on held-out pairs: {results['implicit_accuracy']:.3f}")
    short = failures(results)
    for line in short:
        print("below the target:", line)
    return 1 if short else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
