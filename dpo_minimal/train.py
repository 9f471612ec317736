"""DPO training and evaluation for a (LoRA) causal LM: one loop, TRL's metric names."""

import json
import math
import resource
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import check_pad_token, collate_pairs, tokenize_preferences
from .logprobs import response_logps
from .losses import LOSS_TYPES, dpo_loss
from .models import fused_gelu

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    """Everything a DPO run depends on. Same config, data and seed give the same losses (CPU)."""

    beta: float = 0.1
    learning_rate: float = 5e-4  # LoRA; full fine-tuning wants ~1e-6 (TRL's default)
    batch_size: int = 4  # pairs per micro-batch
    gradient_accumulation_steps: int = 1
    max_length: int = 256
    max_prompt_length: int = 128
    max_steps: int = 100  # optimiser steps
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    seed: int = 0
    dtype: str = "float32"  # float32 | float16 (CUDA, with a GradScaler) | bfloat16
    gradient_checkpointing: bool = False
    warmup_steps: int = 0
    lr_scheduler: str = "cosine"  # cosine | linear | constant, after a linear warmup
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    eval_every: int = 0  # evaluate on eval_data every N steps (0: only at the end)
    eval_batch_size: int = 8
    device: str | None = None  # default: the model's device
    progress: bool = True
    fused_gelu: bool = True  # run gelu_new as one kernel (models.fused_gelu): faster, less memory
    cache_reference: bool = True  # keep each pair's reference log-probs after their first pass

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}: use one of "
                             f"{', '.join(LOSS_TYPES)}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        if self.lr_scheduler not in ("cosine", "linear", "constant"):
            raise ValueError(f"lr_scheduler must be cosine, linear or constant, got "
                             f"{self.lr_scheduler!r}.")
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}.")


class History(list):
    """A list of per-step metric dicts (TRL's names), with JSON round trips."""

    def to_json(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(list(self), indent=1))
        return path

    @classmethod
    def from_json(cls, path) -> "History":
        return cls(json.loads(Path(path).read_text()))

    def series(self, key: str) -> tuple[list, list]:
        """(steps, values) of one metric, skipping steps that did not record it."""
        rows = [row for row in self if key in row]
        return [row["step"] for row in rows], [row[key] for row in rows]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


def _is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def disable_dropout(model) -> None:
    """Set every dropout probability to 0 (in place), as TRL does for DPO.

    With dropout the policy would differ from the reference at step 0 by noise alone; without
    it the first loss is exactly ln 2.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


# Architectures whose logits are exactly lm_head(last hidden state): no scaling or soft-capping.
_PLAIN_HEADS = ("gpt2", "phi")


def _response_logits(model, input_ids, attention_mask, mask) -> torch.Tensor:
    """(N, V) logits at the N positions where `mask` (B, T-1) is set, i.e. `logits[:, :-1][mask]`.

    For GPT-2 and phi (with or without LoRA) the LM head is applied to those positions only: the
    (B, T, V) logits, the largest activation of a small model, are never built, nor their
    gradient. Other architectures go through the model's own forward.
    """
    base = model.get_base_model() if _is_peft(model) else model
    plain = base.config.model_type in _PLAIN_HEADS and (
        not _is_peft(model) or all(c.peft_type == "LORA" for c in model.peft_config.values()))
    if not plain:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits[:, :-1][mask]
    body = getattr(base, base.base_model_prefix)  # GPT2Model / PhiModel, LoRA layers inside
    hidden = body(input_ids=input_ids, attention_mask=attention_mask,
                  use_cache=False).last_hidden_state
    return base.get_output_embeddings()(hidden[:, :-1][mask])


def _forward_logps(model, batch: dict, config: TrainConfig, device, with_entropy=False):
    """One concatenated forward over chosen+rejected rows -> (2B,) summed response log-probs."""
    input_ids = batch["input_ids"].to(device)
    mask = batch["loss_mask"].to(device)[:, 1:].bool()
    with _autocast(device, config.dtype):
        picked = _response_logits(model, input_ids, batch["attention_mask"].to(device), mask)
    logps = response_logps(picked, input_ids[:, 1:][mask], mask)  # = sequence_logps
    if not with_entropy:
        return logps, None
    picked = picked.float().log_softmax(-1)
    entropy = -(picked.exp() * picked).sum(-1).mean()  # mean next-token entropy, nats
    return logps, entropy


def _reference_logps(model, batch, chunk, config, device, reference):
    """(2B,) reference log-probs of the chunk's pairs.

    `reference` is None (the peft model with its adapter disabled), a reference model, or an
    (N, 2) cache of chosen/rejected log-probs indexed by pair. A cache answers when it holds every
    pair of the chunk; NaN rows are computed with the disabled adapter and filled in. That is
    valid because the reference never changes; a recomputation in a batch padded differently
    would differ only by float rounding.
    """
    cache = reference if isinstance(reference, torch.Tensor) else None
    if cache is not None:
        cached = cache[_pair_index(chunk)]
        if not cached.isnan().any():
            return torch.cat([cached[:, 0], cached[:, 1]]).to(device)
    with torch.no_grad():
        if reference is not None and cache is None:
            return _forward_logps(reference, batch, config, device)[0]
        if not _is_peft(model):
            raise ValueError("no reference: pass a peft model (its adapter is disabled for the "
                             "reference) or a reference_model.")
        with model.disable_adapter():
            logps = _forward_logps(model, batch, config, device)[0]
    if cache is not None:
        _store(cache, chunk, logps)
    return logps


def _pair_index(chunk: list[dict]) -> torch.Tensor:
    """The data-set rows of a chunk's pairs (set by `_tokenize`)."""
    return torch.tensor([p["index"] for p in chunk])


def _store(cache: torch.Tensor, chunk: list[dict], logps: torch.Tensor) -> None:
    """Write a chunk's (2B,) chosen-then-rejected log-probs into its rows of an (N, 2) cache."""
    b = len(chunk)
    cache[_pair_index(chunk)] = torch.stack([logps[:b], logps[b:]], dim=1).float().cpu()


def _tokenize(data, tokenizer, config: TrainConfig) -> list[dict]:
    pairs = tokenize_preferences(data, tokenizer, config.max_length, config.max_prompt_length)
    return [{**pair, "index": i} for i, pair in enumerate(pairs)]


@torch.no_grad()
def _cache_reference(model, tokenizer, pairs, config, device) -> torch.Tensor:
    """(N, 2) chosen/rejected log-probs of the model as it is now: a frozen reference."""
    was_training = model.training
    model.eval()
    cache = torch.zeros(len(pairs), 2)
    for chunk in _batches(pairs, config.eval_batch_size):
        batch = collate_pairs(chunk, tokenizer.pad_token_id)
        _store(cache, chunk, _forward_logps(model, batch, config, device)[0])
    model.train(was_training)
    return cache


def _pair_metrics(policy_logps, reference_logps, batch, config) -> tuple[torch.Tensor, dict]:
    """dpo_loss on a (2B,) concatenated batch -> (per-pair losses, metric sums)."""
    b = policy_logps.shape[0] // 2
    lengths = batch["loss_mask"].sum(-1).to(policy_logps.device).float()
    losses, chosen_r, rejected_r = dpo_loss(
        policy_logps[:b], policy_logps[b:], reference_logps[:b], reference_logps[b:],
        beta=config.beta, loss_type=config.loss_type, label_smoothing=config.label_smoothing,
        chosen_lengths=lengths[:b], rejected_lengths=lengths[b:], simpo_gamma=config.simpo_gamma,
    )
    sums = {
        "loss": losses.detach().sum().item(),
        "rewards/chosen": chosen_r.sum().item(),
        "rewards/rejected": rejected_r.sum().item(),
        "rewards/accuracies": (chosen_r > rejected_r).float().sum().item(),  # strict wins
        "rewards/margins": (chosen_r - rejected_r).sum().item(),
        "logps/chosen": policy_logps[:b].detach().sum().item(),
        "logps/rejected": policy_logps[b:].detach().sum().item(),
    }
    return losses, sums


def _batches(pairs: list, batch_size: int, generator: torch.Generator | None = None):
    """Yield lists of pairs: in order, or reshuffled each epoch, forever, given a generator."""
    if generator is None:
        for i in range(0, len(pairs), batch_size):
            yield pairs[i: i + batch_size]
        return
    if len(pairs) < batch_size:
        raise ValueError(f"batch_size={batch_size} exceeds the {len(pairs)} training pairs.")
    while True:
        order = torch.randperm(len(pairs), generator=generator).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):  # drop the ragged tail
            yield [pairs[j] for j in order[i: i + batch_size]]


def _lr_lambda(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        if config.lr_scheduler == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        if config.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # Process peak RSS: KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def _check_precision(config: TrainConfig, device: torch.device) -> None:
    if config.dtype == "float16" and device.type != "cuda":
        raise ValueError("dtype='float16' needs a CUDA GPU (autocast + GradScaler); on CPU use "
                         "'float32' or 'bfloat16'.")


@torch.no_grad()
def _evaluate_pairs(model, tokenizer, pairs, config, device, reference) -> dict:
    was_training = model.training
    model.eval()
    totals, entropy_sum = {}, 0.0
    for chunk in _batches(pairs, config.eval_batch_size):
        batch = collate_pairs(chunk, tokenizer.pad_token_id)
        policy, entropy = _forward_logps(model, batch, config, device, with_entropy=True)
        ref = _reference_logps(model, batch, chunk, config, device, reference)
        _, sums = _pair_metrics(policy, ref, batch, config)
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + value
        entropy_sum += entropy.item() * len(chunk)
    model.train(was_training)
    metrics = {key: value / len(pairs) for key, value in totals.items()}
    metrics["entropy"] = entropy_sum / len(pairs)
    return metrics


def evaluate(model, tokenizer, data, config: TrainConfig, reference_model=None) -> dict:
    """DPO metrics on held-out pairs, without gradients, averaged over all pairs.

    Keys: loss, rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected} and
    entropy (mean next-token entropy of the policy on chosen responses, nats). The reference is
    the peft model with its adapter disabled, or `reference_model` if given. Like `train`, it
    runs the tanh GELU fused when config.fused_gelu is set.
    """
    check_pad_token(tokenizer)
    device = torch.device(config.device) if config.device else next(model.parameters()).device
    pairs = _tokenize(data, tokenizer, config)
    with _fast_activations(config, model, reference_model):
        return _evaluate_pairs(model, tokenizer, pairs, config, device, reference_model)


def _fast_activations(config: TrainConfig, *models) -> ExitStack:
    """`models.fused_gelu` on each model (None is skipped) when config.fused_gelu is set."""
    stack = ExitStack()
    for model in models if config.fused_gelu else ():
        if model is not None:
            stack.enter_context(fused_gelu(model))
    return stack


def train(model, tokenizer, train_data, config: TrainConfig, eval_data=None) -> History:
    """Train `model` with a preference loss on `train_data`; returns the per-step History.

    - Reference: a peft model's adapter disabled, so no second copy of the weights. With
      `cache_reference` (default) each pair's reference log-probs are kept after their first
      pass, so from the second epoch on a step skips the reference forward. A model without an
      adapter (full fine-tuning) gets its reference log-probs computed once, before the first
      step, from its initial weights.
    - With `fused_gelu` (default) the model's Python tanh GELU runs as one fused kernel during
      training (`models.fused_gelu`; the modules are restored on return).
    - Dropout is set to 0 (in place) so step 0 is exactly the reference: loss ln 2.
    - One concatenated chosen+rejected forward per micro-batch; AdamW on trainable parameters;
      warmup + cosine/linear schedule; gradient clipping; autocast (+ GradScaler for float16).
    - Each step records loss, rewards/*, logps/*, grad_norm, learning_rate, step_seconds (wall
      time of the step, before any evaluation), tokens_per_second, peak_memory_gib; with
      eval_data, eval/* metrics every `eval_every` steps and at the end.
      Train metrics of step s come from the forward before its update, eval/* from after it;
      call evaluate() before training for the reference's values.
    - A non-finite loss stops training with NonFiniteLossError naming the step and dtype.
    """
    with _fast_activations(config, model):
        return _train(model, tokenizer, train_data, config, eval_data)


def _train(model, tokenizer, train_data, config: TrainConfig, eval_data) -> History:
    check_pad_token(tokenizer)
    device = torch.device(config.device) if config.device else next(model.parameters()).device
    torch.manual_seed(config.seed)
    pairs = _tokenize(train_data, tokenizer, config)
    eval_pairs = None if eval_data is None else _tokenize(eval_data, tokenizer, config)
    disable_dropout(model)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # so checkpointed blocks see inputs needing grad
    model.to(device).train()

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: call add_lora(model) first, or "
                         "unfreeze the weights for full fine-tuning.")
    if config.dtype == "float16" and any(p.dtype == torch.float16 for p in params):
        raise ValueError("dtype='float16' trains with autocast and a GradScaler, which needs "
                         "float32 trainable weights: load the model in float32 for full "
                         "fine-tuning, or train LoRA adapters (peft keeps them in float32).")
    _check_precision(config, device)
    reference = eval_reference = None  # None: the peft adapter, disabled, at every step
    if not _is_peft(model):  # full fine-tuning: freeze the initial policy's log-probs
        reference = _cache_reference(model, tokenizer, pairs, config, device)
        if eval_pairs is not None:
            eval_reference = _cache_reference(model, tokenizer, eval_pairs, config, device)
    elif config.cache_reference:  # filled as pairs come up; from epoch 2 on, no reference pass
        reference = torch.full((len(pairs), 2), float("nan"))
        if eval_pairs is not None:
            eval_reference = torch.full((len(eval_pairs), 2), float("nan"))
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    scaler = torch.amp.GradScaler("cuda", enabled=config.dtype == "float16")
    batches = _batches(pairs, config.batch_size, torch.Generator().manual_seed(config.seed))
    history = History()
    bar = tqdm(range(config.max_steps), desc="DPO", disable=not config.progress)
    for step in bar:
        start, tokens, totals = time.perf_counter(), 0, {}
        n_pairs = config.batch_size * config.gradient_accumulation_steps
        for _ in range(config.gradient_accumulation_steps):
            chunk = next(batches)
            batch = collate_pairs(chunk, tokenizer.pad_token_id)
            ref = _reference_logps(model, batch, chunk, config, device, reference)
            policy, _ = _forward_logps(model, batch, config, device)
            losses, sums = _pair_metrics(policy, ref, batch, config)
            loss = losses.mean() / config.gradient_accumulation_steps
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"non-finite loss ({loss.item()}) at step {step} with dtype={config.dtype}. "
                    "Likely cause: float16 overflow (e.g. phi-2 attention in fp16 with 'eager' "
                    "attention) or a too-high learning rate. Use attn_implementation='sdpa', "
                    "bfloat16 on Ampere or newer (or float32), or a lower learning_rate."
                )
            scaler.scale(loss).backward()
            tokens += int(batch["attention_mask"].sum())
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + value
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm).item()
        lr = scheduler.get_last_lr()[0]
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        row = {"step": step, **{key: value / n_pairs for key, value in totals.items()},
               "grad_norm": grad_norm, "learning_rate": lr, "step_seconds": seconds,
               "tokens_per_second": tokens / seconds, "peak_memory_gib": _peak_memory_gib(device)}
        last = step == config.max_steps - 1
        due = config.eval_every and step % config.eval_every == 0
        if eval_pairs is not None and (last or due):
            evaluation = _evaluate_pairs(model, tokenizer, eval_pairs, config, device,
                                         eval_reference)
            row.update({f"eval/{key}": value for key, value in evaluation.items()})
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
    model.eval()
    return history


def config_dict(config: TrainConfig) -> dict:
    """The config as a plain dict (for saving next to a History)."""
    return asdict(config)


def generate_pairs(model, tokenizer, prompts: list[str], max_new_tokens: int = 40,
                   seed: int = 0, temperature: float = 0.7) -> list[dict]:
    """Reference (adapter disabled) and policy completions side by side, greedy and sampled.

    Returns one dict per prompt: prompt, reference (greedy), policy (greedy), reference
    (sampled), policy (sampled). Sampling is seeded, so the table is reproducible on one machine.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        row = {"prompt": prompt}
        for label, sample in (("greedy", False), ("sampled", True)):
            for who in ("reference", "policy"):
                torch.manual_seed(seed)
                context = model.disable_adapter() if who == "reference" else nullcontext()
                kwargs = dict(do_sample=True, temperature=temperature, top_k=50) if sample else {}
                with context, torch.no_grad():
                    out = model.generate(**inputs, max_new_tokens=max_new_tokens,
                                         pad_token_id=tokenizer.pad_token_id, **kwargs)
                new = out[0, inputs["input_ids"].shape[1]:]
                row[f"{who} ({label})"] = tokenizer.decode(new, skip_special_tokens=True).strip()
        rows.append(row)
    model.train(was_training)
    return rows


def save_adapter(model, path) -> Path:
    """Save only the LoRA weights (safetensors) and adapter config to `path`."""
    model.save_pretrained(path, safe_serialization=True)
    return Path(path)


def load_adapter(base_model, path):
    """Put a saved adapter back on a fresh base model: a peft model in eval mode."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, path).eval()
