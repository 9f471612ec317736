"""Measure LoRA DPO on phi-2 on a CUDA GPU and compare with dpo_minimal.memory.plan_memory.

phi-2 is built at full size from its config with random weights (no download: the memory and
the speed do not depend on the values), LoRA r=16 on q_proj, k_proj, v_proj, dense, fc1, fc2.
Each run trains a few DPO steps with `dpo_minimal.train` on 2 pairs x 512 tokens (long pairs
made from the shipped data, so every row is exactly 512 tokens: 256 prompt + 256 response) and
prints peak memory, step time, tokens/s and MFU. Random weights can give large losses; that is
fine for memory and speed.

Usage, from the repository root on a GPU machine:
    python benchmarks/measure_phi2_memory.py                  # the four settings below
    python benchmarks/measure_phi2_memory.py --settings float16:on --steps 6
    python benchmarks/measure_phi2_memory.py --peak-tflops 989  # if the GPU is not in PEAK_TFLOPS

Settings (dtype:checkpointing): float16:on, float16:off, bfloat16:on, bfloat16:off. On a T4,
float16:off is expected to run out of memory (the planner says ~16 GiB); it is reported as OOM.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCH_PAIRS, SEQ_LEN, PROMPT_LEN, LORA_R = 2, 512, 256, 16
# Dense (no sparsity) tensor-core peaks in TFLOP/s for 16-bit inputs, from the vendors' sheets.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0,
               "T4": 65.0}


def phi2_config():
    """phi-2's architecture (COURSE.md section 7), offline."""
    from transformers import PhiConfig

    return PhiConfig(vocab_size=51200, hidden_size=2560, intermediate_size=10240,
                     num_hidden_layers=32, num_attention_heads=32, partial_rotary_factor=0.4,
                     tie_word_embeddings=False, max_position_embeddings=2048)


def model_flops_per_token(config, seq_len: int) -> float:
    """Model FLOPs of one LoRA DPO token (recomputation not counted, as MFU conventions do).

    Per token, a matmul parameter costs 2 FLOPs in a forward pass. LoRA DPO runs the policy
    forward (2N), the backward pass for the activations only, since the base is frozen (2N;
    LoRA's own weight gradients are negligible), and the reference forward with the adapter
    disabled (2N): 6N. Attention adds 4 * L * h * T per forward (QK^T and AV, causal masking
    not discounted), three times: 12 * L * h * T. N counts every weight but the token embedding
    (a lookup, no FLOPs).
    """
    h, layers = config.hidden_size, config.num_hidden_layers
    from dpo_minimal.memory import meta_model

    n = sum(p.numel() for p in meta_model(config).parameters()) - config.vocab_size * h
    return 6.0 * n + 12.0 * layers * h * seq_len


def mfu(tokens_per_second: float, flops_per_token: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the hardware peak."""
    return tokens_per_second * flops_per_token / (peak_tflops * 1e12)


def peak_tflops_of(name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def long_pairs(n: int = 16) -> list[dict]:
    """Pairs whose prompt and responses each run past 256 tokens: every row is cut to 512."""
    from dpo_minimal import load_preferences, shipped_data_path

    rows = load_preferences(shipped_data_path("train")).to_list()
    out = []
    for i in range(n):
        take = [rows[(i + k) % len(rows)] for k in range(40)]
        out.append({"prompt": " ".join(r["prompt"] for r in take),
                    "chosen": " ".join(r["chosen"] for r in take),
                    "rejected": " ".join(r["rejected"] for r in take)})
    return out


def measure(dtype: str, checkpointing: bool, steps: int, peak_tflops: float | None,
            fused_gelu: bool = True) -> dict:
    from transformers import AutoModelForCausalLM

    from dpo_minimal import add_lora
    from dpo_minimal.memory import plan_memory
    from dpo_minimal.models import course_tokenizer
    from dpo_minimal.train import TrainConfig, train

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    config = phi2_config()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype),
                                                 attn_implementation="sdpa")
    model = add_lora(model, r=LORA_R)
    tokenizer = course_tokenizer()  # ids < 3.7k fit phi-2's 51.2k vocabulary
    train_config = TrainConfig(beta=0.1, learning_rate=1e-4, batch_size=BATCH_PAIRS,
                               max_length=SEQ_LEN, max_prompt_length=PROMPT_LEN,
                               max_steps=steps, dtype=dtype,
                               gradient_checkpointing=checkpointing, progress=False,
                               fused_gelu=fused_gelu)
    plan = plan_memory(config, batch_pairs=BATCH_PAIRS, seq_len=SEQ_LEN, dtype=dtype,
                       lora_r=LORA_R, gradient_checkpointing=checkpointing,
                       response_fraction=(SEQ_LEN - PROMPT_LEN) / SEQ_LEN,
                       fused_gelu=fused_gelu)
    result = {"dtype": dtype, "checkpointing": checkpointing, "fused_gelu": fused_gelu,
              "planned_total_gib": round(plan["total"], 2),
              "planned_allocated_gib": round(plan["total"] - plan["cuda_context"], 2)}
    try:
        history = train(model, tokenizer, long_pairs(), train_config)
    except torch.OutOfMemoryError:
        result["status"] = "OOM"
        return result
    tokens = 2 * BATCH_PAIRS * SEQ_LEN
    rates = [row["tokens_per_second"] for row in history[2:]] or \
        [history[-1]["tokens_per_second"]]  # the first steps warm up kernels and the allocator
    rate = statistics.median(rates)
    free, total = torch.cuda.mem_get_info()
    result.update({
        "status": "ok",
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "device_used_now_gib": round((total - free) / 2**30, 2),  # includes the CUDA context
        "step_seconds": round(tokens / rate, 3),
        "tokens_per_second": round(rate, 1),
        "first_loss": round(history[0]["loss"], 4),
    })
    if peak_tflops:
        result["mfu"] = round(mfu(rate, model_flops_per_token(config, SEQ_LEN), peak_tflops), 4)
    del model
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="*",
                        default=["float16:on", "float16:off", "bfloat16:on", "bfloat16:off"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--no-fused-gelu", action="store_true",
                        help="train with transformers' gelu_new as written (what TRL runs)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (see benchmarks/memory_phi2.md)")
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or peak_tflops_of(name)
    print(f"device: {name}, peak {peak} TFLOP/s (16-bit), torch {torch.__version__}")
    for setting in args.settings:
        dtype, ckpt = setting.split(":")
        print(json.dumps(measure(dtype, ckpt == "on", args.steps, peak,
                                 not args.no_fused_gelu)), flush=True)


if __name__ == "__main__":
    main()
