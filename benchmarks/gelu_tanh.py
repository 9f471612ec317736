"""The tanh GELU three ways in a DPO train step: GPT-2's gelu_new, the config's gelu_pytorch_tanh,
and the library's fused_gelu patch.

    .venv/bin/python benchmarks/gelu_tanh.py             # prints the tables
    .venv/bin/python benchmarks/gelu_tanh.py --write     # and writes benchmarks/GELU.md
    .venv/bin/python benchmarks/gelu_tanh.py --models tiny --repeats 3   # a quick look

The three variants of one model:
- gelu_new: GPT2Config's default activation_function, transformers' NewGELUActivation (the tanh
  formula as about eight elementwise torch ops);
- gelu_pytorch_tanh: the same config with activation_function="gelu_pytorch_tanh", so that
  transformers builds GELUTanh, torch's gelu(approximate="tanh");
- fused_gelu: the gelu_new model inside `dpo_minimal.models.fused_gelu`, which `train` and
  `evaluate` use by default (it swaps in torch's gelu(approximate="tanh") and restores the
  modules on exit).
The first two are built from one state dict, so all three compute with the same weights.

A step is what `train` does per micro-batch, from the library's own pieces: the reference
log-probs (adapter disabled, no gradient), the policy's (with gradient), `preference_step` (the
DPO loss) and the backward pass into LoRA adapters (r=16 on c_attn, c_proj, c_fc, B = 0). The
batch is random token ids, full length, no padding. Timing: torch on `--threads` threads (1 by
default: on a shared machine a second thread mostly waits for the first); each repeat times
`--steps` steps (after one untimed step, the very first) of each variant in turn, the order
rotating from repeat to repeat so that load from other jobs falls on all alike; a cell is the median
over the repeats (with min and max). Logits: max |difference| between the variants' logits on
the batch (float32, no adapter), and of the summed response log-probs.
"""

import argparse
import os
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from bench_ddp import environment_notes, write_report  # this folder's: run as a script
from transformers import GPT2Config, GPT2LMHeadModel

from dpo_minimal import TrainConfig, add_lora, collate_pairs
from dpo_minimal.logprobs import batch_logps, row_logps
from dpo_minimal.models import ARCHITECTURES, course_tokenizer, fused_gelu
from dpo_minimal.train import disable_dropout, preference_step

OUT = Path(__file__).resolve().parent / "GELU.md"
VARIANTS = ("gelu_new", "gelu_pytorch_tanh", "fused_gelu")
# name -> (description, GPT2Config, pairs per batch, tokens per row, prompt tokens, default
# repeats and timed steps per repeat: the whole run stays under about 3 minutes on one thread)
MODELS = {
    "tiny": ("tiny_model('gpt2'): 4 layers, width 128",
             lambda: ARCHITECTURES["gpt2"].tiny_config(_token_ids()), 8, 128, 32, 5, 3),
    "124m": ("GPT-2 124M shape (GPT2Config(): 12 layers, width 768, vocab 50257; random init)",
             GPT2Config, 2, 256, 64, 3, 1),
}


def _token_ids() -> dict:
    tokenizer = course_tokenizer()
    return {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def _models(name: str) -> dict:
    """The gelu_new model and the gelu_pytorch_tanh one, same weights, each with LoRA."""
    _, make_config, *_ = MODELS[name]
    config = make_config()
    torch.manual_seed(0)
    base = GPT2LMHeadModel(config)
    tanh_config = GPT2Config(**{**config.to_dict(), "activation_function": "gelu_pytorch_tanh"})
    tanh = GPT2LMHeadModel(tanh_config)
    tanh.load_state_dict(base.state_dict())
    models = {}
    for key, model in (("gelu_new", base), ("gelu_pytorch_tanh", tanh)):
        disable_dropout(model)  # as train does: the variants then compute the same function
        torch.manual_seed(1)  # the same LoRA init for both
        models[key] = add_lora(model.train(), r=16, alpha=32, dropout=0.0)
    return models


def _batch(name: str, vocab: int) -> dict:
    _, _, pairs, tokens, prompt, *_ = MODELS[name]
    generator = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(vocab, (n,), generator=generator).tolist()

    rows = [{"prompt_ids": ids(prompt), "chosen_ids": ids(tokens - prompt),
             "rejected_ids": ids(tokens - prompt)} for _ in range(pairs)]
    return collate_pairs(rows, pad_token_id=0)


def _step(model, batch: dict, config: TrainConfig) -> None:
    """One DPO micro-step as `train` runs it: reference, policy, loss, backward."""
    with torch.no_grad(), model.disable_adapter():
        reference = batch_logps(model, batch)
    policy = batch_logps(model, batch)
    losses, _ = preference_step(policy, reference, batch, config)
    losses.mean().backward()
    model.zero_grad(set_to_none=True)


def _context(variant: str, models: dict):
    """(model, context manager) of a variant: fused_gelu patches the gelu_new model."""
    if variant == "fused_gelu":
        return models["gelu_new"], fused_gelu(models["gelu_new"])
    return models[variant], nullcontext()


def _time(models: dict, batch: dict, repeats: int, steps: int) -> dict:
    """Seconds per step of each variant, one figure per repeat, variants interleaved."""
    config, times = TrainConfig(), {v: [] for v in VARIANTS}
    for r in range(repeats):
        for variant in VARIANTS[r % 3:] + VARIANTS[:r % 3]:
            model, patch = _context(variant, models)
            with patch:
                if not any(times.values()):  # untimed, once: the allocator and kernels warm up
                    _step(model, batch, config)
                start = time.perf_counter()
                for _ in range(steps):
                    _step(model, batch, config)
                times[variant].append((time.perf_counter() - start) / steps)
    return times


@torch.no_grad()
def _differences(models: dict, batch: dict) -> dict:
    """Max |difference| of logits and of summed response log-probs between the variants."""
    out = {}
    for variant in VARIANTS:
        model, patch = _context(variant, models)
        with patch, model.disable_adapter():
            logits = model(input_ids=batch["input_ids"], use_cache=False).logits
            out[variant] = (logits, row_logps(model, batch))
    pairs = (("gelu_new", "gelu_pytorch_tanh"), ("gelu_new", "fused_gelu"),
             ("gelu_pytorch_tanh", "fused_gelu"))
    return {f"{a} vs {b}": tuple((x - y).abs().max().item() for x, y in zip(out[a], out[b]))
            for a, b in pairs}


READING = """## Reading the tables

- gelu_pytorch_tanh and fused_gelu run the same operator, torch's
  `gelu(approximate="tanh")`: transformers' GELUTanh calls it, and so does the TanhGELU module
  that fused_gelu swaps in. Their logits agree bit for bit (the rows "gelu_pytorch_tanh vs
  fused_gelu"), so any gap between their timings is noise from the shared machine, not the
  kernel: speed does not choose between them.
- Against gelu_new, the one operator replaces about eight elementwise passes over the MLP's
  (rows, T, 4d) activation, four of which autograd keeps for the backward pass; the logits
  move by float rounding only.

## Conclusion: keep fused_gelu; do not set gelu_pytorch_tanh in the config

gelu_pytorch_tanh is exactly as fast as fused_gelu (it is the same kernel), so the choice is
about what else each one changes. The library keeps `fused_gelu`, a patch that `train` and
`evaluate` apply and undo, rather than setting `activation_function="gelu_pytorch_tanh"` in
`tiny_model` and `load_model`:
- the patch reaches every GPT-2 and phi model that is trained, however it was loaded (a local
  folder, a user's own `from_pretrained`, the shipped pretrained tiny model, whose saved
  config says gelu_new), with no per-family key (GPT-2's `activation_function`, phi's
  `hidden_act`);
- outside training the model computes exactly what its published config says, and a model
  saved with `save_pretrained` keeps that config: a config change would alter every saved
  full fine-tune, every forward outside training (generation, the notebooks' committed
  outputs) and the TRL comparisons, for no speed;
- the DPO step itself, where the time goes, already runs the fused kernel by default.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--repeats", type=int, help="default: 5 (tiny), 3 (124m)")
    parser.add_argument("--steps", type=int, help="timed steps per repeat; default 3, 1")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true", help=f"write {OUT.name}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start, load_start = time.time(), os.getloadavg()
    timing = ["| model | batch | variant | s/step: median | min / max | median vs gelu_new |",
              "|---|---|---|---|---|---|"]
    logits = ["| model | variants | max abs logit difference | max abs log-prob difference |",
              "|---|---|---|---|"]
    runs = []
    for name in args.models:
        description, _, pairs, tokens, _, repeats, steps = MODELS[name]
        repeats, steps = args.repeats or repeats, args.steps or steps
        runs.append(f"{name} {repeats} x {steps}")
        models = _models(name)
        batch = _batch(name, models["gelu_new"].get_base_model().config.vocab_size)
        times = _time(models, batch, repeats, steps)
        base = statistics.median(times["gelu_new"])
        for variant in VARIANTS:
            median = statistics.median(times[variant])
            timing.append(f"| {description} | {pairs} pairs x {tokens} tokens | {variant} | "
                          f"{median:.4f} | {min(times[variant]):.4f} / "
                          f"{max(times[variant]):.4f} | **{median / base:.2f}x** |")
        for label, (logit, logp) in _differences(models, batch).items():
            logits.append(f"| {name} | {label} | {logit:.1e} | {logp:.1e} |")
    notes = [
        f"- Repeats x timed steps per variant: {', '.join(runs)} (one untimed step before "
        "all), "
        f"interleaved; torch on {args.threads} thread(s); LoRA r=16 on c_attn, c_proj, c_fc; "
        "float32 on CPU.",
        *environment_notes(load_start, start),
    ]
    text = "\n".join(timing + [""] + logits + [""] + notes)
    print(text)
    if args.write:
        write_report(OUT, "The tanh GELU in a DPO step: gelu_new, gelu_pytorch_tanh, fused_gelu",
                     "gelu_tanh.py", "Ratios below 1 are faster than GPT-2's default gelu_new.",
                     text + "\n\n" + READING)


if __name__ == "__main__":
    main()
