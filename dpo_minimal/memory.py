"""Will it fit? A GPU-memory plan for LoRA DPO, from a transformers config alone (offline).

The model is built on the meta device (no storage, no download, no time), so the parameter
count and the shapes of the LoRA targets are exact; the activations follow a per-layer formula
that counts the tensors autograd keeps for the backward pass (`activation_bytes_per_token`).
These are estimates: a measurement on the GPU is the final word (benchmarks/memory_phi2.md).
"""

import torch

from .models import ARCHITECTURES, Architecture, lora_target_names
from .train import DTYPES

GIB = 2**30
T4_USABLE_GIB = 14.75  # a T4's 15 GiB as the CUDA allocator sees it, less what the driver keeps
DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
# Bytes per token a norm keeps for its backward pass: its input in float32 (CUDA runs
# layer_norm in float32 under autocast; RMSNorm casts to float32 in Python), plus float32
# statistics: mean and 1/std for layer_norm, 1/rms for RMSNorm.
_NORM_BYTES = {"layernorm": lambda h: 4 * h + 8, "rmsnorm": lambda h: 4 * h + 4}
# Bytes per response position and vocabulary entry at the step's peak, the start of the
# backward pass through `logprobs.response_logps`: the float32 logits that logsumexp keeps, and
# its gradient grad * exp(x - lse), which holds x - lse, its exp and the product, all float32
# (N, V). The LM head's output in the compute dtype is gone by then. Measured on CPU by
# tests/test_memory.py (live tensor bytes) and on an H200 (GPT-2 124M 8 x 512: 6.09 GiB peak;
# the earlier count, one float32 copy plus the (2B, T, V) logits, planned 4.58).
LOGIT_BYTES = 16


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
        return DTYPES[dtype]
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}.")
    return dtype


def _dims(config) -> dict:
    """Hidden size h, MLP width f, heads a, key/value width kv, layers L and vocabulary V."""
    h, a = config.hidden_size, config.num_attention_heads
    f = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h
    head_dim = getattr(config, "head_dim", None) or h // a
    kv = (getattr(config, "num_key_value_heads", None) or a) * head_dim
    return {"h": h, "f": f, "a": a, "kv": kv, "L": config.num_hidden_layers,
            "V": config.vocab_size}


def _architecture(config, arch: Architecture | None) -> Architecture:
    """`arch`, the registry's entry for the config's family, or one read off its model."""
    if arch is not None:
        return arch
    if config.model_type in ARCHITECTURES:
        return ARCHITECTURES[config.model_type]
    return inferred_architecture(config)


def inferred_architecture(config) -> Architecture:
    """An `Architecture` for a family without a registry entry, read off its model on the meta
    device: a SwiGLU MLP (gate, up, down) or a two-layer one (fc1, fc2 or c_fc, c_proj), its
    norms (RMSNorm or LayerNorm, counted in the first block), peft's LoRA targets, and the
    model's own forward for the logits (no head shortcut). Raises ValueError, naming the way
    out, for a block it does not recognise."""
    model = meta_model(config)
    names = {name.split(".")[-1] for name, _ in model.named_modules()}
    first = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), None)
    block = first[0] if first is not None and len(first) else None
    if block is None or not ({"gate_proj", "up_proj", "down_proj"} <= names
                             or {"fc1", "fc2"} <= names):
        raise ValueError(
            f"the memory planner cannot read the blocks of model_type {config.model_type!r}: "
            "pass arch=, an Architecture describing them (e.g. dpo_minimal.models."
            "ARCHITECTURES['llama'] for a Llama-like family), or add an entry to ARCHITECTURES.")
    norms = [m for m in block.modules() if "norm" in type(m).__name__.lower()]
    rms = any("rms" in type(m).__name__.lower() for m in norms)
    swiglu = {"gate_proj", "up_proj", "down_proj"} <= names
    out_proj = next((n for n in ("o_proj", "dense", "out_proj") if n in names), "o_proj")
    return Architecture(
        model_class=type(model), tiny_config=None, lora_targets=tuple(lora_target_names(model)),
        fan_in_fan_out=False, plain_head=False, mlp="swiglu" if swiglu else "gelu",
        norm="rmsnorm" if rms else "layernorm", norms_per_block=max(1, len(norms)),
        shared_inputs=(("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")),
        attn_out_proj=out_proj)


def meta_model(config):
    """The model of `config` on the meta device: the real module tree, no storage, offline."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def lora_targets(model, target_modules: list[str] | None = None) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of every module LoRA would wrap (peft's name match).

    Default targets are the family's `Architecture.lora_targets`. Handles
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
                               fused_gelu: bool = True, padded: bool = True,
                               arch: Architecture | None = None) -> float:
    """Bytes that ONE decoder layer keeps per token for the backward pass (LoRA, frozen base).

    With h = hidden size, f = MLP width, a = heads, kv = key/value width (h without grouped-query
    attention), r = LoRA rank, T = sequence length and s = bytes of the compute dtype, a block
    keeps (the family's `Architecture` says which MLP and norms it has):

    - each norm's input in float32, 4h, and its float32 statistics: 8 bytes for layer_norm (mean
      and 1/std; CUDA runs it in float32 under autocast), 4 for RMSNorm (1/rms; it casts to
      float32 itself). phi-2 has one norm per block, GPT-2 and Llama two;
    - each LoRA target's input, for the gradient of A: the sum of d_in over the targets, s bytes
      each. Under autocast peft casts the input to the adapter's float32 and autocast casts it
      back, so each target keeps its own copy. In float32 targets that read one tensor share it
      (`Architecture.shared_inputs`: phi's q, k, v, fc1; Llama's q, k, v and its gate, up), and
      with sdpa the output projection reads the very tensor sdpa keeps as its output;
    - the rank-r output of each A, for the gradient of B: r per target;
    - attention, sdpa (flash or memory-efficient kernels): q, k, v and the output, s (2h + 2kv),
      and a float32 log-sum-exp per head, 4a. With `padded` (DPO batches are: chosen and
      rejected differ in length) transformers passes a (T, T) mask, which sdpa converts to the
      compute dtype in every layer and keeps, T s; and it repeats k and v to every head before
      sdpa, so they are h wide, not kv. Eager: q, k and v repeated to every head, 3h s, and the
      T x T weights, float32 after the softmax plus, under autocast, their copy in the compute
      dtype for the product with v: a T (4 + s) bytes (a T 4 in float32);
    - the MLP. "gelu" (GPT-2, phi-2): transformers' tanh GELU ("gelu_new") run fused, as
      `dpo_minimal.train` does by default (`models.fused_gelu`), keeps only its input, f;
      written as elementwise ops (`fused_gelu=False`, what TRL runs) it keeps 4f: its input,
      x/2, tanh and 1 + tanh. "swiglu" (Llama): down(silu(gate(x)) * up(x)) keeps 3f: the gate's
      output (the SiLU's input), the SiLU's output and up's output, both factors of the product.
      The input of fc2 / down_proj is counted with the LoRA inputs.

    The frozen base weights need no saved inputs (the input's gradient needs only the weight),
    and dropout is off in DPO training (as in TRL), so no masks are kept. For phi-2 in fp16
    (T = 512, padded): 4h + 8 + s * (9h + 2f + 6r + T) + 4a, about 99 kB per token per layer
    fused, and 4h + 8 + s * (9h + 5f + 6r + T) + 4a, about 160 kB, unfused. For Llama
    (SmolLM2-135M: h = 576, f = 1536, a = 9, kv = 192, 30 layers) in bf16, padded:
    2 (4h + 4) + s * (6h + f + 7r + 4h + T + 3f) + 4a, about 30 kB per token per layer
    (kv instead of h for k and v, and no T term, if the batch has no padding). For full
    fine-tuning (lora_r=0) the same inputs are kept, now for the weight gradients.
    `arch` describes an unregistered family (default: its `ARCHITECTURES` entry).
    """
    dtype = _dtype(dtype)
    s = DTYPE_BYTES[dtype]
    d = _dims(config)
    arch = _architecture(config, arch)
    model = meta_model(config) if model is None else model
    targets = lora_targets(model, arch.lora_targets)
    inputs = sum(d_in for _, d_in, _ in targets)
    if dtype == torch.float32:  # no casts: targets reading one tensor keep it once per layer
        for group in arch.shared_inputs:
            shared = [d_in for name, d_in, _ in targets if name.split(".")[-1] in group]
            inputs -= sum(shared) - sum(shared) // len(group)
        if attn_implementation == "sdpa":  # the output projection's input is sdpa's output
            inputs -= sum(d_in for name, d_in, _ in targets
                          if name.endswith("." + arch.attn_out_proj))
    per_token = arch.norms_per_block * _NORM_BYTES[arch.norm](d["h"])
    per_token += s * (inputs + lora_r * len(targets)) / d["L"]  # LoRA inputs and A outputs
    if attn_implementation == "eager":
        per_token += s * 3 * d["h"]  # q, and k and v repeated to every head
        per_token += d["a"] * seq_len * (4 if dtype == torch.float32 else 4 + s)  # weights
    else:
        kv = d["h"] if padded else d["kv"]  # with a mask, k and v are repeated to every head
        per_token += s * (2 * d["h"] + 2 * kv) + 4 * d["a"]  # q, k, v, output; log-sum-exp
        per_token += s * seq_len if padded else 0  # the mask, in the compute dtype
    if arch.mlp == "swiglu":
        per_token += s * 3 * d["f"]  # gate's output (SiLU's input), SiLU's output, up's output
    else:
        per_token += s * (1 if fused_gelu else 4) * d["f"]  # the GELU's input (+ 3 temporaries)
    return float(per_token)


def plan_memory(config, *, batch_pairs: int, seq_len: int, dtype, lora_r: int = 16,
                gradient_checkpointing: bool = True, response_fraction: float = 1.0,
                attn_implementation: str = "sdpa", cuda_context_gib: float = 0.5,
                fused_gelu: bool = True, padded: bool = True,
                arch: Architecture | None = None) -> dict:
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
            (SwiGLU families have no GELU: ignored.)
        padded: the batches are padded (DPO's are), so attention gets a mask; with grouped-query
            attention False counts k and v at their own width (`activation_bytes_per_token`).
        arch: an `Architecture` for a family that has no `ARCHITECTURES` entry (default: the
            config's entry; an unregistered family raises ValueError).

    Returns a dict of GiB:
        weights: every parameter in `dtype` (fp16: 2 bytes each, so phi-2 is 5.18 GiB);
        lora_parameters, lora_gradients, optimizer_state: r * (d_in + d_out) per target, kept in
            float32 (peft upcasts adapters), float32 gradients and AdamW's two float32 moments;
        activations_no_checkpointing: L * 2B * T * `activation_bytes_per_token`;
        activations_checkpointing: L * 2B * T * h * s (each layer's input) plus one layer's
            activations, rebuilt during the backward pass;
        activations: the one of those two that `gradient_checkpointing` selects;
        logits: the vocabulary-wide tensors of the log-softmax at the N = 2B * (T-1) *
            `response_fraction` response positions, at their peak: the start of the backward
            pass, when `response_logps`'s float32 logits (kept by logsumexp for its backward)
            and the three float32 (N, V) tensors of logsumexp's gradient, grad * exp(x - lse),
            are alive together with every stored activation: 16 N V bytes (`LOGIT_BYTES`).
            The trainer applies the LM head at the response positions only
            (`logprobs.response_logits`), so no (2B, T, V) tensor exists; for a family whose
            `Architecture.plain_head` is False the model's full (2B, T, V) logits in the compute
            dtype are added (an estimate: no such family is registered, so none was measured);
        cuda_context: `cuda_context_gib`;
        total: the sum of weights, LoRA, optimiser, activations, logits and cuda_context.

    The reference log-probs come from the same model with its adapter disabled, under no_grad:
    no second copy of the weights and no stored activations (its passing peak is below the
    policy's). With gradient checkpointing the total slightly overestimates: the one layer
    rebuilt in the backward pass and the logits' peak are not alive at the same time. Full
    fine-tuning in `dpo_minimal.train` caches them before training instead.
    """
    dtype = _dtype(dtype)
    for name, value in (("batch_pairs", batch_pairs), ("seq_len", seq_len), ("lora_r", lora_r)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    if batch_pairs < 1 or seq_len < 1 or lora_r < 0:
        raise ValueError(f"batch_pairs and seq_len must be >= 1 and lora_r >= 0, got "
                         f"{batch_pairs}, {seq_len} and {lora_r}.")
    if not cuda_context_gib >= 0:
        raise ValueError(f"cuda_context_gib must be >= 0, got {cuda_context_gib}.")
    if not 0.0 <= response_fraction <= 1.0:
        raise ValueError(f"response_fraction must be in [0, 1], got {response_fraction}.")
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got "
                         f"{attn_implementation!r}.")
    s = DTYPE_BYTES[dtype]
    d = _dims(config)
    arch = _architecture(config, arch)
    model = meta_model(config)
    n_params = sum(p.numel() for p in model.parameters())
    if lora_r > 0:
        targets = lora_targets(model, arch.lora_targets)
        n_train = sum(lora_r * (d_in + d_out) for _, d_in, d_out in targets)
        weights, adapter = n_params * s, n_train * 4
    else:  # full fine-tuning: the float32 master weights ARE the trained parameters
        n_train = n_params
        weights, adapter = n_params * 4, 0
    tokens = 2 * batch_pairs * seq_len
    per_layer = activation_bytes_per_token(config, dtype, lora_r, seq_len, attn_implementation,
                                           model=model, fused_gelu=fused_gelu, padded=padded,
                                           arch=arch)
    no_ckpt = d["L"] * tokens * per_layer
    ckpt = d["L"] * tokens * d["h"] * s + tokens * per_layer
    response_rows = 2 * batch_pairs * (seq_len - 1) * response_fraction
    logits = response_rows * d["V"] * LOGIT_BYTES
    if not arch.plain_head:  # the model's own forward builds every position's logits
        logits += tokens * d["V"] * s
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


def parallel_plan(config, plan: dict, processes: int, fsdp: bool, dtype: str) -> dict:
    """`plan_memory`'s GiB per GPU when `processes` GPUs train together (an estimate).

    Data parallel (DDP): each GPU holds the whole plan (a replica and its own micro-batch of
    `batch_pairs`), plus the flat buffer in which `dpo_minimal.train` all-reduces gradients (at
    most 2**25 float32 values at a time). FSDP (full fine-tuning, `plan` with lora_r=0): the
    float32 weights, gradients and AdamW moments are split over the GPUs; while it computes,
    each GPU also holds the root group gathered (embeddings, final norm, head: FSDP keeps it for
    the backward) and two gathered decoder blocks (the current one and the prefetched next), in
    the compute dtype (`shard_fsdp` gathers in it). Activations, logits and the CUDA context
    are per GPU either way.
    """
    out = {key: value for key, value in plan.items() if key != "total"}
    if fsdp:
        model = meta_model(config)
        blocks = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
        block = max(sum(p.numel() for p in b.parameters()) for b in blocks)
        root = sum(p.numel() for p in model.parameters()) - sum(
            p.numel() for b in blocks for p in b.parameters())
        for key in ("weights", "lora_gradients", "optimizer_state"):
            out[key] = plan[key] / processes
        extra = {"gathered_weights": (root + 2 * block) * DTYPE_BYTES[DTYPES[dtype]] / GIB}
    else:
        trained = plan["lora_gradients"] * GIB / 4  # float32 gradients: 4 bytes each
        extra = {"gradient_bucket": min(trained, 2**25) * 4 / GIB if processes > 1 else 0.0}
    out.update(extra)
    summed = ("weights", "lora_parameters", "lora_gradients", "optimizer_state", "activations",
              "logits", "cuda_context", *extra)
    return {**out, "total": sum(out[key] for key in summed)}
