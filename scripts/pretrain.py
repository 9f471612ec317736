"""Pretrain one of the course's tiny models on the task world's SFT corpus, and ship it.

    python scripts/pretrain.py                  # train, then write dpo_minimal/pretrained/gpt2/
    python scripts/pretrain.py --arch phi       # the tiny phi, into dpo_minimal/pretrained/phi/
    python scripts/pretrain.py --out /tmp/gpt2  # somewhere else
    python scripts/pretrain.py --check          # exit 1 unless a retrain gives the shipped hash

The model is `tiny_model(arch)`'s GPT2LMHeadModel or PhiForCausalLM with the course tokenizer,
unchanged except for the sizes set below, trained from its seeded random start with next-token
cross-entropy on the response tokens of dpo_minimal/data/task_sft.jsonl (the prompt is context,
not a target). The corpus is a demonstrator that is right about half the time and brief about
half the time, so the model comes out fluent but only partly right: the room DPO needs. Same
seed, same thread count, same machine: the same weights, bit for bit (the hash is in RECIPE.md).
"""

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from dpo_minimal.course import task
from dpo_minimal.data import DATA_DIR
from dpo_minimal.models import PRETRAINED_DIR as SHIPPED
from dpo_minimal.models import tiny_model

# Per arch: the config keys of depth, width and heads, and tiny_model(arch)'s values for them.
SIZE_KEYS = {"gpt2": ("n_layer", "n_embd", "n_head"),
             "phi": ("num_hidden_layers", "hidden_size", "num_attention_heads")}
SIZES = {"gpt2": (4, 128, 4), "phi": (4, 128, 4)}  # see RECIPE.md
CLASS_NAMES = {"gpt2": "GPT-2", "phi": "phi"}


def encode(rows: list[dict], tokenizer) -> list[tuple[list[int], int]]:
    """(prompt + completion + EOS ids, number of prompt tokens) per SFT row."""
    prompts = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    answers = tokenizer([r["completion"] for r in rows], add_special_tokens=False)["input_ids"]
    return [(p + a + [tokenizer.eos_token_id], len(p)) for p, a in zip(prompts, answers)]


def batch(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded (B, T) input ids, attention mask and targets (-100 off the response)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    targets = torch.full((len(examples), width), -100)
    for r, (ids, n_prompt) in enumerate(examples):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention[r, : len(ids)] = 1
        targets[r, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
    return input_ids, attention, targets


def train(args) -> tuple:
    """Train from tiny_model's seeded start -> (model, tokenizer, losses, wall s, CPU s)."""
    torch.set_num_threads(args.threads)
    model, tokenizer = tiny_model(args.arch, seed=args.seed)
    config = model.config
    depth, width, heads = SIZE_KEYS[args.arch]
    config.update({depth: args.n_layer, width: args.n_embd, heads: SIZES[args.arch][2]})
    if args.arch == "phi":  # phi's MLP is 4x its width, as in phi-2
        config.update({"intermediate_size": 4 * args.n_embd})
    torch.manual_seed(args.seed)
    model = type(model)(config)
    rows = [json.loads(line) for line in (DATA_DIR / "task_sft.jsonl").read_text().splitlines()]
    data = encode(rows, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01,
                                  betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)

    def factor(step: int) -> float:  # linear warmup, then cosine down to a tenth
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(args.seed)
    order, losses, start, cpu = [], [], time.perf_counter(), time.process_time()
    model.train()
    for step in range(args.steps):
        if len(order) < args.batch_size:  # a new epoch, reshuffled
            order += torch.randperm(len(data), generator=generator).tolist()
        picked, order = order[: args.batch_size], order[args.batch_size:]
        input_ids, attention, targets = batch([data[i] for i in picked], tokenizer.pad_token_id)
        # The LM head only where a response token is predicted: a third of the positions.
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention).last_hidden_state
        trained = targets[:, 1:] != -100
        logits = model.get_output_embeddings()(hidden[:, :-1][trained])
        loss = torch.nn.functional.cross_entropy(logits, targets[:, 1:][trained])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 200 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  "
                  f"{time.perf_counter() - start:6.0f} s", flush=True)
    return (model.eval(), tokenizer, losses, time.perf_counter() - start,
            time.process_time() - cpu)


def measure(model, tokenizer, n_samples: int, seed: int = 0) -> dict:
    """Sampled (temperature 1) and greedy quality on every question of the world."""
    prompts = [task.render(f.question) for f in task.facts()]
    rows = task.sample(model, tokenizer, prompts, n_samples=n_samples, seed=seed)
    parts = [task.judge(r["prompt"], y) for r in rows for y in r["responses"]]
    heldout = {p["prompt"] for p in task.heldout_prompts()}
    held = [task.judge(r["prompt"], y) for r in rows if r["prompt"] in heldout
            for y in r["responses"]]
    return {
        "sampled_correct": sum(p["correct"] for p in parts) / len(parts),
        "sampled_brief": sum(p["brief"] == 1.0 for p in parts) / len(parts),
        "sampled_on_topic": sum(p["on_topic"] for p in parts) / len(parts),
        "sampled_mean_reward": sum(p["reward"] for p in parts) / len(parts),
        "heldout_mean_reward": sum(p["reward"] for p in held) / len(held),
        "heldout_correct": sum(p["correct"] for p in held) / len(held),
        "n_samples": len(parts),
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(model, tokenizer, out: Path, args, losses, seconds, quality, load) -> str:
    """Weights (safetensors), config, generation config and RECIPE.md; returns the sha256.

    `seconds` is (wall, CPU) of the training loop; `load` the load average before and after.
    """
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.max_new_tokens = 32
    model.save_pretrained(out, safe_serialization=True)
    digest = sha256(out / "model.safetensors")
    n_params = sum(p.numel() for p in model.parameters())
    size = (out / "model.safetensors").stat().st_size
    command = "python scripts/pretrain.py " + " ".join(sys.argv[1:])
    dropout = ("dropout as in GPT2Config" if args.arch == "gpt2"
               else "no dropout (PhiConfig's default)")
    (out / "RECIPE.md").write_text(f"""# The course's pretrained tiny {CLASS_NAMES[args.arch]}

`tiny_model("{args.arch}", pretrained=True)` loads this folder. Rebuild it with `make pretrain`.

- What: `{type(model).__name__}`, {args.n_layer} layers, width {args.n_embd},
  {SIZES[args.arch][2]} heads,
  {n_params:,} parameters (float32), the shipped course tokenizer (`course_tokenizer()`).
- Data: `dpo_minimal/data/task_sft.jsonl` (the task world's SFT corpus; see the data card),
  next-token cross-entropy on the response tokens and the EOS after them.
- Command: `{command.strip()}`
- Seed {args.seed}, {args.steps} steps of {args.batch_size} sequences, AdamW (lr {args.lr},
  betas 0.9/0.98, weight decay 0.01, gradient clipping 1.0), warmup {max(1, args.steps // 20)}
  steps then cosine to lr/10, torch threads: {args.threads}, {dropout}.
- Training time: {seconds[0]:.0f} s wall, {seconds[1]:.0f} s CPU (this process), on
  {platform.machine()} ({os.cpu_count()} cores, torch {torch.__version__}); 1-minute load
  average before/after {load[0]:.1f}/{load[1]:.1f}. Other jobs shared the machine, so the wall
  time is an upper bound; the CPU time is close to what an idle core takes.
- Final training loss (mean of the last 50 steps): {sum(losses[-50:]) / len(losses[-50:]):.4f}.
- `model.safetensors`: {size / 2**20:.2f} MiB, sha256 `{digest}`.
  The same seed and thread count on the same machine give the same bytes; another CPU may
  differ in the last bits (its float kernels differ).

Quality, sampled at temperature 1 ({quality['n_samples']} responses: every question of the
world), judged by `dpo_minimal.course.task.reward`:

| measure | value |
|---|---|
| right answer | {quality['sampled_correct']:.3f} |
| brief (one sentence, then stop) | {quality['sampled_brief']:.3f} |
| names the question's subject | {quality['sampled_on_topic']:.3f} |
| mean reward | {quality['sampled_mean_reward']:.3f} |
| mean reward, held-out prompts | {quality['heldout_mean_reward']:.3f} |
| right answer, held-out prompts | {quality['heldout_correct']:.3f} |

The demonstrator behind the corpus is right with probability {task.P_RIGHT} and brief with
probability {task.P_BRIEF}; the model imitates both, which is what leaves DPO room to improve.
""")
    return digest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--arch", choices=sorted(SIZES), default="gpt2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-layer", type=int, help="depth (default: tiny_model's)")
    parser.add_argument("--n-embd", type=int, help="width (default: tiny_model's)")
    # One thread: bit-reproducible on any machine with the same kernels, and far faster than
    # two when other jobs share the cores (OpenMP threads then wait on each other).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=8, help="per question, for RECIPE.md")
    parser.add_argument("--out", type=Path, help="default: dpo_minimal/pretrained/ARCH/")
    parser.add_argument("--check", action="store_true",
                        help="retrain into a scratch folder and compare the hash with RECIPE.md")
    args = parser.parse_args()
    args.n_layer = args.n_layer or SIZES[args.arch][0]
    args.n_embd = args.n_embd or SIZES[args.arch][1]
    args.out = args.out or SHIPPED / args.arch
    shipped = SHIPPED / args.arch / "RECIPE.md"
    if args.check:
        import tempfile

        args.out = Path(tempfile.mkdtemp()) / args.arch
    load_before = os.getloadavg()[0]
    model, tokenizer, losses, *seconds = train(args)
    quality = measure(model, tokenizer, args.samples)
    digest = save(model, tokenizer, args.out, args, losses, seconds, quality,
                  (load_before, os.getloadavg()[0]))
    print(json.dumps({"wall_s": round(seconds[0]), "cpu_s": round(seconds[1]), "sha256": digest,
                      **quality}, indent=1))
    if args.check:
        same = digest in shipped.read_text()
        print("same weights as shipped" if same else "the weights differ from the shipped ones")
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
