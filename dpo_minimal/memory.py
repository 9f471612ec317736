"""Will it fit? A GPU-memory plan for LoRA DPO, from a transformers config alone (offline).

The model is built on the meta device (no storage, no download, no time), so the parameter
count and the shapes of the LoRA targets are exact; the activations follow a per-layer formula
that counts the tensors autograd keeps for the backward pass (`activation_bytes_per_token`).
These are estimates: a measurement on the GPU is the final word (benchmarks/memory_phi2.md).
"""

import torch

from .models import lora_target_names
from .train import DTYPES

GIB = 2**30
T4_USABLE_GIB = 14.75  # a T4's 15 GiB as the CUDA allocator sees it, less what the driver keeps
DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
# Per architecture: layer norms per block, and LoRA targets that read one and the same tensor
# (phi-2's parallel block feeds the layer norm's output to q, k, v and fc1).
_BLOCKS = {
    "phi": {"norms": 1, "shared_inputs": ("q_proj", "k_proj", "v_proj", "fc1")},
    "gpt2": {"norms": 2, "shared_inputs": ()},
}


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
        return DTYPES[dtype]
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}.")
    return dtype


def _dims(config) -> dict:
    """Hidden size h, MLP width f, heads a, layers L and vocabulary V of a config."""
    h = config.hidden_size
    f = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h
    return {"h": h, "f": f, "a": config.num_attention_heads, "L": config.num_hidden_layers,
                "V": config.vocab_size}


def meta_model(config):
    """The model of `config` on the meta device: the real module tree, no storage, offline."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def lora_targets(model, target_modules: list[str] | None = None) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of every module LoRA would wrap (peft's name match).

    Default targets per architecture come from `dpo_minimal.models.LORA_TARGETS`. Handles
    `nn.Linear` (weight (out, in)) and GPT-2's `Conv1D` (weight (in, out)).
    """
    from transformers.pytorch_utils import Conv1D

    target_modules = lora_target_names(model, target_modules)
    out = []
    for name, module in model.named_modules():
        if name.split(".")[-1] not in target_modules:
            continue
        if isinstance(module, torch.nn.Linear):
            out.append((name, module.in_features, module.out_features))
        elif isinstance(module, Conv1D):
            out.append((name, *module.weight.shape))
    if not out:
        raise ValueError(f"none of {list(target_modules)} is a Linear/Conv1D in this model.")
    return out


def activation_bytes_per_token(config, dtype, lora_r: int = 16, seq_len: int = 512,
                               attn_implementation: str = "sdpa", model=None,
                               fused_gelu: bool = True) -> float:
    """Bytes that ONE decoder layer keeps per token for the backward pass (LoRA, frozen base).

    With h = hidden size, f = MLP width, a = heads, r = LoRA rank, T = sequence length and
    s = bytes of the compute dtype, a phi-2 or GPT-2 block keeps:

    - its layer-norm inputs, n_norm * h: 4 bytes each under fp16/bf16 autocast, where CUDA runs
      layer_norm in float32 (phi-2 has one norm per block, GPT-2 two);
    - each LoRA target's input, for the gradient of A: the sum of d_in over the targets, s bytes
      each (phi: q, k, v, dense, fc1 = 5h and fc2 = f; GPT-2: c_attn, c_proj, c_fc = 3h and the
      MLP's c_proj = f). Under autocast peft casts the input to the adapter's float32 and
      autocast casts it back, so each target keeps its own copy; in float32, targets that read
      one tensor (phi's q, k, v and fc1 read the layer norm's output) share it;
    - the rank-r output of each A, for the gradient of B: r per target;
    - attention: q, k, v and the output, 4h; sdpa (flash or memory-efficient kernels) adds a
      float32 log-sum-exp per head (4a bytes), while eager keeps the T x T weights, in float32
      after the softmax and in the compute dtype for the product with v: a * T * (4 + s) bytes;
    - the MLP's tanh GELU ("gelu_new" in both models): run fused, as `dpo_minimal.train` does
      by default (`models.fused_gelu`), it keeps only its input, f; written as transformers'
      elementwise ops (`fused_gelu=False`, what TRL runs) it keeps 4f: its input, x/2, tanh and
      1 + tanh. fc2's input is counted with the LoRA inputs.

    The frozen base weights need no saved inputs (the input's gradient needs only the weight),
    and dropout is off in DPO training (as in TRL), so no masks are kept. For phi-2 in fp16:
    4h + s * (10h + 2f + 6r) + 4a, about 97 kB per token per layer fused, and
    4h + s * (10h + 5f + 6r) + 4a, about 159 kB, unfused. For full fine-tuning (lora_r=0) the
    same inputs are kept, now for the weight gradients.
    """
    dtype = _dtype(dtype)
    s = DTYPE_BYTES[dtype]
    d = _dims(config)
    model = meta_model(config) if model is None else model
    block = _BLOCKS.get(config.model_type, {"norms": 2, "shared_inputs": ()})
    targets = lora_targets(model)
    inputs = sum(d_in for _, d_in, _ in targets)
    if dtype == torch.float32:  # no casts: targets reading one tensor keep it once per layer
        shared = [d_in for name, d_in, _ in targets
                  if name.split(".")[-1] in block["shared_inputs"]]
        inputs -= sum(shared) - (sum(shared) // len(block["shared_inputs"]) if shared else 0)
    per_token = block["norms"] * d["h"] * (s if dtype == torch.float32 else 4)  # norm inputs
    per_token += s * (inputs + lora_r * len(targets)) / d["L"]  # LoRA inputs and A outputs
    per_token += s * 4 * d["h"]  # q, k, v and the attention output
    if attn_implementation == "eager":
        per_token += d["a"] * seq_len * (4 + s)  # softmax weights: float32 and compute dtype
    else:
        per_token += 4 * d["a"]  # sdpa's float32 log-sum-exp
    per_token += s * (1 if fused_gelu else 4) * d["f"]  # the GELU's input (+ 3 temporaries)
    return float(per_token)


def plan_memory(config, *, batch_pairs: int, seq_len: int, dtype, lora_r: int = 16,
                gradient_checkpointing: bool = True, response_fraction: float = 1.0,
                attn_implementation: str = "sdpa", cuda_context_gib: float = 0.5,
                fused_gelu: bool = True) -> dict:
    """Estimate the peak GPU memory (GiB) of one DPO training step with LoRA.

    Args:
        config: a transformers config (e.g. `PhiConfig(...)`, `GPT2Config()`); the model is
            built on the meta device, so this is offline and instant.
        batch_pairs: preference pairs per micro-batch B; the forward sees 2B sequences.
        seq_len: tokens per sequence T (prompt + response, after padding).
        dtype: compute dtype of the weights and activations (torch dtype or its name).
        lora_r: LoRA rank on the architecture's default targets; 0 means full fine-tuning
            (every weight trained: float32 master weights, gradients and AdamW state).
        gradient_checkpointing: keep only each layer's input and recompute one layer at a time.
        response_fraction: share of the T positions that are response tokens (1.0: worst case).
        attn_implementation: "sdpa" (default; no T x T matrix) or "eager".
        cuda_context_gib: allowance for the CUDA context, cuBLAS workspace and fragmentation.
        fused_gelu: the MLP's tanh GELU runs as one kernel (`dpo_minimal.train`'s default);
            False counts transformers' elementwise version, as TRL and a plain Trainer run it.

    Returns a dict of GiB:
        weights: every parameter in `dtype` (fp16: 2 bytes each, so phi-2 is 5.18 GiB);
        lora_parameters, lora_gradients, optimizer_state: r * (d_in + d_out) per target, kept in
            float32 (peft upcasts adapters), float32 gradients and AdamW's two float32 moments;
        activations_no_checkpointing: L * 2B * T * `activation_bytes_per_token`;
        activations_checkpointing: L * 2B * T * h * s (each layer's input) plus one layer's
            activations, rebuilt during the backward pass;
        activations: the one of those two that `gradient_checkpointing` selects;
        logits: the (2B, T, V) logits in the compute dtype, plus the float32 copy that
            `sequence_logps` makes at response positions only (2B * (T-1) * response_fraction);
        cuda_context: `cuda_context_gib`;
        total: the sum of weights, LoRA, optimiser, activations, logits and cuda_context.

    The reference log-probs come from the same model with its adapter disabled, under no_grad:
    no second copy of the weights and no stored activations (its passing peak is below the
    policy's). Full fine-tuning in `dpo_minimal.train` caches them before training instead.
    """
    dtype = _dtype(dtype)
    if batch_pairs < 1 or seq_len < 1 or lora_r < 0:
        raise ValueError("batch_pairs and seq_len must be >= 1 and lora_r >= 0.")
    if not 0.0 <= response_fraction <= 1.0:
        raise ValueError(f"response_fraction must be in [0, 1], got {response_fraction}.")
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got "
                         f"{attn_implementation!r}.")
    s = DTYPE_BYTES[dtype]
    d = _dims(config)
    model = meta_model(config)
    n_params = sum(p.numel() for p in model.parameters())
    if lora_r > 0:
        n_train = sum(lora_r * (d_in + d_out) for _, d_in, d_out in lora_targets(model))
        weights, adapter = n_params * s, n_train * 4
    else:  # full fine-tuning: the float32 master weights ARE the trained parameters
        n_train = n_params
        weights, adapter = n_params * 4, 0
    tokens = 2 * batch_pairs * seq_len
    per_layer = activation_bytes_per_token(config, dtype, lora_r, seq_len, attn_implementation,
                                           model=model, fused_gelu=fused_gelu)
    no_ckpt = d["L"] * tokens * per_layer
    ckpt = d["L"] * tokens * d["h"] * s + tokens * per_layer
    response_rows = 2 * batch_pairs * (seq_len - 1) * response_fraction
    logits = tokens * d["V"] * s + response_rows * d["V"] * 4
    plan = {
        "weights": weights / GIB,
        "lora_parameters": adapter / GIB,
        "lora_gradients": n_train * 4 / GIB,
        "optimizer_state": 2 * n_train * 4 / GIB,
        "activations_no_checkpointing": no_ckpt / GIB,
        "activations_checkpointing": ckpt / GIB,
        "activations": (ckpt if gradient_checkpointing else no_ckpt) / GIB,
        "logits": logits / GIB,
        "cuda_context": float(cuda_context_gib),
    }
    plan["total"] = sum(plan[k] for k in ("weights", "lora_parameters", "lora_gradients",
                                          "optimizer_state", "activations", "logits",
                                          "cuda_context"))
    return plan
