"""The course's GPU check: memory, speed and MFU of LoRA DPO, and full-mode step times on a T4.

Run it through benchmarks/gpu_check.sh: its budget is 8 minutes on one H100/H200 (not yet timed
on a GPU: none was lent while it was written); nothing is downloaded.
Every model is built from its config with random weights on the GPU: memory and speed do not
depend on the values. Pairs come from the shipped data, joined so that each row is cut to
exactly the sequence length (the worst case; real truthy-dpo pairs are shorter). It measures:

1. phi-2 LoRA DPO (r=16), 2 pairs x 512 tokens: peak memory with and without gradient
   checkpointing, in float16 and bfloat16, against dpo_minimal.memory.plan_memory; step time,
   tokens/s and model-FLOP utilisation (benchmarks/measure_phi2_memory.py's FLOP count).
2. GPT-2 124M LoRA DPO steps per second (notebook 04's full-mode micro-batch).
3. Notebook 04's and 05's full-mode step (batch, accumulation, length, checkpointing) in float16,
   the T4's dtype, scaled to a T4 (see t4_factor for the assumption).
4. bf16 MFU at larger micro-batches: phi-2 at 8 and 16 pairs x 512 (checkpointing), GPT-2 124M
   at 32 pairs x 512: which batch gets near 40 % of the GPU's peak.

benchmarks/gpu_check.sh runs scripts/rehearse.py --cuda (every notebook in full mode, tiny
models on the GPU) before these measurements.

    python benchmarks/gpu_check.py                # on a CUDA GPU: writes benchmarks/GPU_CHECK.md
    python benchmarks/gpu_check.py --dry-run      # CPU, tiny configs, seconds (CI)
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from measure_phi2_memory import (  # noqa: E402
    PEAK_TFLOPS,
    long_pairs,
    mfu,
    model_flops_per_token,
    peak_tflops_of,
    phi2_config,
)

# Memory bandwidth in TB/s, from the vendors' sheets (SXM parts for H100/H200).
BANDWIDTH_TBS = {"H200": 4.8, "H100": 3.35, "A100": 2.0, "L4": 0.3, "A10": 0.6, "T4": 0.32}
# (name, model, dtype, pairs per micro-batch, micro-batches per step, tokens, checkpointing,
#  the notebook's max_steps or 0). Dtypes: what each row measures on the GPU; the dry run swaps
#  float16 for float32, since training refuses float16 off CUDA.
ROWS = [
    ("phi-2 LoRA", "phi-2", "float16", 2, 1, 512, True, 0),
    ("phi-2 LoRA", "phi-2", "float16", 2, 1, 512, False, 0),
    ("phi-2 LoRA", "phi-2", "bfloat16", 2, 1, 512, True, 0),
    ("phi-2 LoRA", "phi-2", "bfloat16", 2, 1, 512, False, 0),
    ("GPT-2 124M LoRA", "gpt2", "bfloat16", 8, 1, 512, False, 0),
    ("nb04 full mode", "gpt2", "float16", 8, 1, 512, False, 200),
    ("nb05 full mode", "phi-2", "float16", 2, 4, 512, True, 100),
    # bf16 MFU at larger micro-batches (Ampere or newer; a small GPU may run out of memory here)
    ("phi-2 LoRA, larger batch", "phi-2", "bfloat16", 8, 1, 512, True, 0),
    ("phi-2 LoRA, larger batch", "phi-2", "bfloat16", 16, 1, 512, True, 0),
    ("GPT-2 124M LoRA, larger batch", "gpt2", "bfloat16", 32, 1, 512, False, 0),
]


def model_config(name: str, dry_run: bool):
    """phi-2's or GPT-2 124M's config; with dry_run, a tiny one of the same architecture."""
    from transformers import GPT2Config, PhiConfig

    if not dry_run:
        return phi2_config() if name == "phi-2" else GPT2Config()  # the 124M defaults
    if name == "phi-2":
        return PhiConfig(vocab_size=4096, hidden_size=64, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, partial_rotary_factor=0.4,
                         tie_word_embeddings=False, max_position_embeddings=2048)
    return GPT2Config(vocab_size=4096, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                      eos_token_id=0)


def t4_factor(device_name: str) -> tuple[float, str]:
    """How many times longer a T4 takes than this GPU, and why.

    Assumption: the T4 reaches the same fraction of its peak as this GPU does of its own, on
    whichever resource binds: fp16 tensor FLOP/s (T4 65 TFLOP/s) or memory bandwidth (T4 320
    GB/s). The larger of the two ratios is taken, so the estimate errs towards a slow T4.
    """
    peak, bandwidth = peak_tflops_of(device_name), None
    for key, value in BANDWIDTH_TBS.items():
        if key in device_name:
            bandwidth = value
    if peak is None or bandwidth is None:
        return float("nan"), f"no peak figures for {device_name!r}: add it to PEAK_TFLOPS"
    flops, memory = peak / PEAK_TFLOPS["T4"], bandwidth / BANDWIDTH_TBS["T4"]
    return max(flops, memory), (f"x{max(flops, memory):.1f} = max(peak FLOP/s ratio "
                                f"{flops:.1f}, bandwidth ratio {memory:.1f})")


def measure(label: str, name: str, dtype: str, pairs: int, accumulation: int, seq_len: int,
            checkpointing: bool, steps: int, device: str, dry_run: bool) -> dict:
    """Train `steps` LoRA DPO steps on a fresh random model; time, peak memory, plan, MFU."""
    from transformers import AutoModelForCausalLM

    from dpo_minimal import add_lora
    from dpo_minimal.memory import plan_memory
    from dpo_minimal.models import course_tokenizer
    from dpo_minimal.train import TrainConfig, train

    config = model_config(name, dry_run)
    plan = plan_memory(config, batch_pairs=pairs, seq_len=seq_len, dtype=dtype, lora_r=16,
                       gradient_checkpointing=checkpointing, response_fraction=0.5)
    row = {"run": label, "dtype": dtype, "pairs x tokens": f"{pairs} x {seq_len}",
           "accumulation": accumulation, "checkpointing": "on" if checkpointing else "off",
           "planned allocated (GiB)": plan["total"] - plan["cuda_context"]}
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype),
                                                     attn_implementation="sdpa")
        model = add_lora(model, r=16)
        train_config = TrainConfig(
            beta=0.1, learning_rate=1e-4, batch_size=pairs, max_length=seq_len,
            gradient_accumulation_steps=accumulation, max_prompt_length=seq_len // 2,
            max_steps=steps, dtype=dtype, gradient_checkpointing=checkpointing, progress=False)
        # Enough distinct pairs that no measured step reuses cached reference log-probs.
        data = long_pairs(pairs * accumulation * steps)
        history = train(model, course_tokenizer(), data, train_config)
    except torch.OutOfMemoryError:
        return {**row, "status": "OOM"}
    seconds = statistics.median(r["step_seconds"] for r in history[1:])  # step 0 warms up
    tokens = 2 * pairs * accumulation * seq_len
    return {**row, "status": "ok", "measured peak (GiB)": history[-1]["peak_memory_gib"],
            "step (s)": seconds, "steps/s": 1 / seconds, "tokens/s": tokens / seconds,
            "flops_per_token": model_flops_per_token(config, seq_len)}


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def table(rows: list[dict], peak: float | None, factor: float, notebook_steps: dict) -> str:
    """The Markdown table: measured against planned memory, speed, MFU, the T4 estimate.

    With no peak (a dry run) MFU, the memory ratio and the T4 estimate are "n/a": on a CPU the
    measured peak is the process's resident memory, not comparable with the plan.
    """
    head = ["run", "dtype", "pairs x tokens", "accumulation", "checkpointing",
            "planned allocated (GiB)", "measured peak (GiB)", "measured / planned", "step (s)",
            "steps/s", "tokens/s", "MFU", "T4 estimate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = dict(row)
        if row["status"] == "ok":
            cells.update({"measured / planned": "n/a", "MFU": "n/a", "T4 estimate": "n/a"})
            n, t4_step = notebook_steps.get(row["run"], 0), row["step (s)"] * factor
            if peak:
                planned = row["planned allocated (GiB)"]
                cells["measured / planned"] = row["measured peak (GiB)"] / planned
                cells["MFU"] = f"{mfu(row['tokens/s'], row['flops_per_token'], peak):.3f}"
            if t4_step == t4_step:  # not NaN
                cells["T4 estimate"] = (f"{t4_step:.2f} s/step" +
                                        (f", {n} steps ~ {n * t4_step / 60:.0f} min" if n else ""))
        else:
            cells.update({k: row["status"] for k in head[6:]})
        lines.append("| " + " | ".join(_cell(cells.get(k, "")) for k in head) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny configs, 3 steps of 64 tokens: checks the script runs")
    parser.add_argument("--steps", type=int, default=8, help="steps per run (GPU)")
    parser.add_argument("--out", type=Path, default=None,
                        help="Markdown file (default benchmarks/GPU_CHECK.md; dry run: "
                             "build/gpu-check-dry.md)")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA GPU: run with --dry-run for the CPU check", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    name = "CPU" if args.dry_run else torch.cuda.get_device_name()
    peak = None if args.dry_run else peak_tflops_of(name)
    factor, why = (float("nan"), "no T4 estimate in a dry run") if args.dry_run else \
        t4_factor(name)
    out = args.out or (ROOT / "build" / "gpu-check-dry.md" if args.dry_run
                       else ROOT / "benchmarks" / "GPU_CHECK.md")
    start, rows = time.perf_counter(), []
    for label, model, dtype, pairs, accumulation, seq_len, ckpt, _ in ROWS:
        if args.dry_run:
            dtype, seq_len = ("float32" if dtype == "float16" else dtype), 64
        row = measure(label, model, dtype, pairs, accumulation, seq_len, ckpt,
                      3 if args.dry_run else args.steps, device, args.dry_run)
        print({k: v for k, v in row.items() if k != "flops_per_token"}, flush=True)
        rows.append(row)
    notebook_steps = {label: n for label, *_, n in ROWS if n}
    text = (f"# GPU check ({'dry run, ' if args.dry_run else ''}{name})\n\n"
            f"torch {torch.__version__}, {time.perf_counter() - start:.0f} s. Written by "
            "benchmarks/gpu_check.py: random weights, every row cut to its full length (2 pairs "
            "x 512 tokens means 2,048 tokens a micro-batch), LoRA r=16 on the default targets, "
            "`dpo_minimal.train` defaults (fused GELU, sdpa). Peak: "
            "`torch.cuda.max_memory_allocated`, against `plan_memory(..., "
            "response_fraction=0.5)` less its CUDA-context allowance. Step time: median of "
            "steps 1 onwards. MFU: model FLOPs (6N + attention per token, "
            f"measure_phi2_memory.py) over {peak or 'n/a'} TFLOP/s. T4 estimate: {why}; the "
            "notebooks' own evaluation and generation time is not included.\n\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + table(rows, peak, factor, notebook_steps))
    print(f"wrote {out}")
    # An out-of-memory row without checkpointing, or at a larger batch, is a finding, not a fault.
    return 0 if all(r["status"] == "ok" or "off" in r["checkpointing"]
                    or "larger batch" in r["run"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
