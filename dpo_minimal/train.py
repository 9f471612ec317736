"""DPO training and evaluation for a (LoRA) causal LM: one short loop, TRL's metric names.

The step the course is about is public: `batch_logps` (one forward over chosen + rejected rows),
a `Reference` for the log-probs of pi_ref, and `preference_step` (the loss and its metrics).
"""

import json
import math
import os
import resource
import shutil
import sys
import time
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, RandomSampler
from tqdm.auto import tqdm

from .adapters import save_adapter
from .checkpoint import (
    STATE_FILE,
    CheckpointError,
    StopRequests,
    all_finite,
    changed_fingerprints,
    check_output_dir,
    checkpoints,
    clear_checkpoints,
    expand_output_dir,
    fingerprints,
    read_state,
    unreadable,
)
from .data import (
    check_pad_token,
    collate_pairs,
    collate_unpaired,
    load_preferences,
    tokenize_preferences,
)
from .logprobs import DTYPES, _is_fsdp, _is_peft, batch_logps
from .losses import LOSSES, check_loss_settings, kto_loss
from .models import fused_gelu

SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


@dataclass
class TrainConfig:
    """Everything a DPO run depends on. Same config, data and seed give the same losses (CPU)."""

    # Each field's comment is its help text in the command line (dpo_minimal.cli).
    beta: float = 0.1  # strength of the KL penalty: larger keeps the policy nearer the reference
    learning_rate: float = 5e-4  # AdamW's peak rate; LoRA ~5e-4, full fine-tuning ~1e-6 (TRL's)
    batch_size: int = 4  # pairs per micro-batch, per process
    gradient_accumulation_steps: int = 1  # micro-batches per optimiser step
    max_length: int = 256  # tokens of prompt + response; responses are cut from the right
    max_prompt_length: int = 128  # prompt tokens kept, cut from the left
    max_steps: int = 100  # optimiser steps
    loss_type: str = "sigmoid"  # a key of dpo_minimal.losses.LOSSES
    label_smoothing: float = 0.0  # assumed share of flipped labels (cDPO / robust DPO)
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    desirable_weight: float = 1.0  # KTO's lambda_D, the weight of desirable (chosen) examples
    undesirable_weight: float = 1.0  # KTO's lambda_U, the weight of undesirable examples
    seed: int = 0  # data order and torch's random state
    dtype: str = "float32"  # compute dtype (autocast); float16 needs CUDA (GradScaler)
    gradient_checkpointing: bool = False  # recompute activations in the backward: less memory
    warmup_steps: int = 0  # steps of linear learning-rate warmup
    lr_scheduler: str = "cosine"  # cosine | linear | constant, after a linear warmup
    max_grad_norm: float | None = 1.0  # clip the gradient norm to this (None: no clipping)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    eval_every: int = 0  # evaluate on eval_data every N steps (0: only at the end)
    eval_batch_size: int = 8  # pairs per evaluation batch
    device: str | None = None  # where to train (None: the model's device)
    progress: bool = True  # show a tqdm progress bar
    logging_steps: int = 0  # print a line of metrics every N steps (0: never)
    fused_gelu: bool = True  # run gelu_new as one kernel (models.fused_gelu): faster, less memory
    cache_reference: bool = True  # keep each pair's reference log-probs after their first pass
    drop_overlong: bool = False  # drop pairs whose prompt fills max_length (else raise)

    output_dir: str | None = None  # where checkpoint-{step}/ folders go
    save_steps: int = 0  # save a checkpoint every N steps and at the end (0: never)
    save_total_limit: int | None = None  # keep only the newest K checkpoints of this run
    overwrite_output_dir: bool = False  # replace a run already in output_dir (its checkpoints)

    def __post_init__(self):
        for field in fields(self):
            _check_type(field.name, getattr(self, field.name), _FIELD_TYPES[field.type])
        self.output_dir = expand_output_dir(self.output_dir)
        check_loss_settings(self.loss_type, self.beta, self.label_smoothing)
        if not math.isfinite(self.beta):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta} (try 0.1).")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"device={self.device!r} is not a device: use 'cpu', 'cuda', "
                                 "'cuda:1', 'mps' or None (the model's device).") from None
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {', '.join(SCHEDULERS)}, got "
                             f"{self.lr_scheduler!r}.")
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps", "max_length",
                     "max_prompt_length", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("warmup_steps", "eval_every", "save_steps", "seed", "logging_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite number > 0, got "
                             f"{self.learning_rate} (LoRA: try 5e-4; full fine-tuning: 1e-6).")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}: 0 would "
                             "zero every gradient and a negative norm reverses them; use None "
                             "for no clipping (1.0 is the usual value).")
        for name in ("desirable_weight", "undesirable_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value} (1.0 weighs "
                                 "desirable and undesirable examples alike).")
            if value != 1.0 and self.loss_type != "kto":
                raise ValueError(f"{name} weighs KTO's examples; loss_type={self.loss_type!r} "
                                 f"does not use it: leave it at 1.0 or set loss_type='kto'.")
        if not 0 <= self.weight_decay < 1 or not 0 <= self.simpo_gamma < 1e3:
            raise ValueError(f"weight_decay must be in [0, 1) and simpo_gamma >= 0, got "
                             f"{self.weight_decay} and {self.simpo_gamma}.")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below "
                             f"max_length ({self.max_length}), or no response token is left; "
                             "lower max_prompt_length or raise max_length.")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps "
                             f"({self.max_steps}): the learning rate would never reach its "
                             "value; lower warmup_steps.")
        if self.save_steps and self.output_dir is None:
            raise ValueError(f"save_steps={self.save_steps} needs output_dir, the folder where "
                             "checkpoint-{step}/ is written: set output_dir or save_steps=0.")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1 or None (keep all), got "
                             f"{self.save_total_limit}.")


# The type each TrainConfig annotation demands (bool is not accepted as an int or float).
_FIELD_TYPES = {float: (float, int), int: (int,), str: (str,), bool: (bool,),
                str | None: (str, type(None)), int | None: (int, type(None)),
                float | None: (float, int, type(None))}


def _check_type(name: str, value, types: tuple) -> None:
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        wanted = " or ".join(t.__name__ for t in types).replace("NoneType", "None")
        raise ValueError(f"TrainConfig.{name} must be {wanted}, got {value!r} "
                         f"({type(value).__name__}).")


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
    """Training produced a NaN or infinite loss, gradient norm or weight."""


def _divergence_fix(config: "TrainConfig") -> str:
    """The likely cause of a non-finite value in a run with this config, and the fix."""
    if config.dtype == "float16":
        return ("likely a float16 overflow (e.g. phi-2 attention in float16 with 'eager' "
                "attention) or a too-high learning rate. Use attn_implementation='sdpa', "
                "bfloat16 on Ampere or newer (or float32), or a lower learning_rate.")
    return (f"the run diverged, most likely because learning_rate={config.learning_rate:g} is "
            "too high for it (LoRA: try 5e-4 or lower; full fine-tuning: 1e-6). Start again "
            "with a lower learning_rate (a new output_dir, or overwrite_output_dir=True); "
            "max_grad_norm (clipping) also guards against single large gradients.")


def disable_dropout(model) -> None:
    """Set every dropout probability to 0 (in place), as TRL does for DPO.

    With dropout the policy would differ from the reference at step 0 by noise alone; without
    it the first loss is exactly ln 2.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


class Reference:
    """Where pi_ref's log-probs come from. One of three:

    - `Reference()`: the policy itself with its peft adapter disabled (no second copy);
    - `Reference(model=ref_model)`: a separate frozen model;
    - either of those with `cache=torch.full((n_pairs, 2), nan)`: each pair's chosen and
      rejected log-probs are kept after their first pass, so later epochs skip the reference
      forward; `Reference.frozen(...)` fills the cache from a model up front. For unpaired
      examples the cache is (n_examples, 1), one completion each.
    A cache answers a batch when it holds every pair of it; that is valid because the
    reference never changes (a recomputation in a differently padded batch would differ only
    by float rounding).
    """

    def __init__(self, model=None, cache: torch.Tensor | None = None):
        self.model, self.cache = model, cache

    @classmethod
    @torch.no_grad()
    def frozen(cls, model, tokenizer, pairs: list[dict], batch_size: int, dtype: str):
        """A cache of `model`'s log-probs now, for every pair: full fine-tuning's reference."""
        was_training = model.training
        model.eval()
        reference = cls(cache=torch.zeros(len(pairs), _rows_per_example(pairs)))
        for chunk in _in_order(pairs, batch_size):
            batch = _collate(chunk, tokenizer)
            reference._store(batch, batch_logps(model, batch, dtype))
        model.train(was_training)
        return reference

    @torch.no_grad()
    def logps(self, policy, batch: dict, dtype: str = "float32") -> torch.Tensor:
        """(2B,) log pi_ref of the batch's rows (B, unpaired), on the policy's device."""
        if self.cache is not None:
            cached = self.cache[batch["index"]]
            if not cached.isnan().any():
                device = next(policy.parameters()).device
                return cached.T.reshape(-1).to(device)  # column by column: chosen, rejected
        if self.model is not None:
            logps = batch_logps(self.model, batch, dtype)
        elif _is_peft(policy):
            with policy.disable_adapter():
                logps = batch_logps(policy, batch, dtype)
        else:
            raise ValueError("no reference: pass a peft model (its adapter is disabled for the "
                             "reference), a reference model, or a frozen cache.")
        if self.cache is not None:
            self._store(batch, logps)
        return logps

    def _store(self, batch: dict, logps: torch.Tensor) -> None:
        self.cache[batch["index"]] = _per_example(logps, len(batch["index"])).float().cpu()


def _per_example(logps: torch.Tensor, b: int) -> torch.Tensor:
    """(2B,) chosen-then-rejected log-probs -> (B, 2), one row a pair ((B,) -> (B, 1))."""
    return logps.reshape(-1, b).T


def _rows_per_example(pairs: list[dict]) -> int:
    """Forward rows an example takes: 2 for a pair (chosen, rejected), 1 for unpaired data."""
    return 1 if pairs and "completion_ids" in pairs[0] else 2


def preference_step(policy_logps: torch.Tensor, reference_logps: torch.Tensor | None,
                    batch: dict, config: TrainConfig) -> tuple[torch.Tensor, dict]:
    """One step of the objective: per-pair losses (B,) and the batch's metric sums.

    `policy_logps` and `reference_logps` are (2B,) over the batch's chosen then rejected rows
    (`reference_logps` may be None for a loss that needs none, SimPO and ORPO). The loss is
    `LOSSES[config.loss_type]`; for DPO (Eq 7 of the paper)
    -log sigma(beta [log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l)]).
    The sums (divide by the number of pairs for means) use TRL's metric names.

    An unpaired batch (`collate_unpaired`, with `label`) trains KTO: the log-probs are (B,),
    one per example, `batch["kl_logps"]` the (policy, reference) log-probs of its mismatched
    rows, which estimate z0 (absent: z0 = 0), and the losses are `kto_loss`'s (B,).
    """
    if "label" in batch:
        return _kto_step(policy_logps, reference_logps, batch, config)
    b = policy_logps.shape[0] // 2
    lengths = batch["loss_mask"].sum(-1).to(policy_logps.device).float()
    losses, chosen_r, rejected_r = LOSSES[config.loss_type].fn(
        policy_logps, reference_logps, lengths, config)
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


def _kto_step(policy_logps, reference_logps, batch, config):
    """`preference_step` on unpaired examples. As TRL does, rewards/chosen and logps/chosen
    sum over the desirable examples and .../rejected over the undesirable ones (counted under
    count/*, so that `_mean` divides by those counts); kl sums z0, once per example."""
    if config.loss_type != "kto":
        raise ValueError(_UNPAIRED_LOSS.format(config.loss_type))
    desirable = batch["label"].to(policy_logps.device)
    losses, rewards, z0 = kto_loss(
        policy_logps, reference_logps, desirable, *batch.get("kl_logps", (None, None)),
        beta=config.beta, lambda_d=config.desirable_weight, lambda_u=config.undesirable_weight)
    logps, undesirable = policy_logps.detach(), ~desirable
    sums = {"loss": losses.detach().sum().item(),
            "rewards/chosen": rewards[desirable].sum().item(),
            "rewards/rejected": rewards[undesirable].sum().item(),
            "logps/chosen": logps[desirable].sum().item(),
            "logps/rejected": logps[undesirable].sum().item(),
            "kl": z0.item() * len(desirable),
            "count/desirable": desirable.sum().item(),
            "count/undesirable": undesirable.sum().item()}
    return losses, sums


_UNPAIRED_LOSS = ("the data is unpaired (prompt, completion, label), which only loss_type='kto' "
                  "trains, not loss_type={!r}: set loss_type='kto', or pass pairs (prompt, "
                  "chosen, rejected).")


def _collate(chunk: list[dict], tokenizer, max_length: int | None = None) -> dict:
    """`collate_pairs` (or `collate_unpaired`), plus the data-set rows (for the reference
    cache)."""
    if "completion_ids" in chunk[0]:
        batch = collate_unpaired(chunk, tokenizer.pad_token_id, max_length)
    else:
        batch = collate_pairs(chunk, tokenizer.pad_token_id)
    batch["index"] = torch.tensor([p["index"] for p in chunk])
    return batch


@torch.no_grad()
def _kl_logps(model, batch: dict, dtype: str, reference_model=None):
    """(policy, reference) log-probs of an unpaired batch's mismatched rows, batch["kl"].

    Without gradient, as in TRL: z0 is detached, so these rows need no backward pass. Their
    reference is computed each time (never cached): which completion a prompt borrows depends
    on the batch it was drawn in.
    """
    return (batch_logps(model, batch["kl"], dtype),
            Reference(reference_model).logps(model, batch["kl"], dtype))


def _tokenize(data, tokenizer, config: TrainConfig, model=None) -> list[dict]:
    """Rows -> tokenised examples with their index; conversational rows are rendered with
    `tokenizer`'s own chat template (the model's format), and every id must fit `model`."""
    data = load_preferences(data, tokenizer=tokenizer)  # raw rows get the same checks as files
    if "label" in data.column_names and config.loss_type != "kto":
        raise ValueError(_UNPAIRED_LOSS.format(config.loss_type))
    pairs = tokenize_preferences(data, tokenizer, config.max_length, config.max_prompt_length,
                                 drop_overlong=config.drop_overlong)
    if model is not None:
        _check_token_ids(model, tokenizer, pairs)
    return [{**pair, "index": i} for i, pair in enumerate(pairs)]


def _check_token_ids(model, tokenizer, pairs: list[dict]) -> None:
    """Every token id (the pad id too) indexes a row of the model's input embedding."""
    rows = model.get_input_embeddings().num_embeddings
    top = max(max((max(ids, default=0) for key, ids in pair.items() if key.endswith("_ids")),
                  default=0) for pair in pairs)
    top = max(top, tokenizer.pad_token_id)
    if top >= rows:
        raise ValueError(f"the tokenizer gives token id {top}, but the model's embedding has "
                         f"only {rows} rows: the tokenizer is not this model's. Use the model's "
                         "own tokenizer, or after adding tokens call "
                         "model.resize_token_embeddings(len(tokenizer)).")


def _check_weights_loaded(model) -> None:
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("the model's weights are on the meta device (sized, never loaded), so "
                         "there is nothing to train: load real weights, e.g. with "
                         "from_pretrained(...) or load_model(...), not init_empty_weights().")


def _check_adapter(model) -> None:
    """A LoRA model trains its adapters, and its reference is the same model with them off."""
    if not _is_peft(model):
        return
    for name, config in model.peft_config.items():
        alphas = [getattr(config, "lora_alpha", 1), *getattr(config, "alpha_pattern", {}).values()]
        if min(alphas) <= 0:
            raise ValueError(f"LoRA adapter {name!r} has lora_alpha={min(alphas)}: its update "
                             "is scaled by alpha / r, so it would train nothing (or backwards); "
                             "use alpha > 0, e.g. 2 * r (add_lora's default is 32 for r = 16).")
    base = [n for n, p in model.named_parameters()
            if p.requires_grad and "lora_" not in n and "modules_to_save" not in n]
    if base:
        raise ValueError(f"base weights require grad ({', '.join(base[:3])}"
                         f"{', ...' if len(base) > 3 else ''}), but the reference is this model "
                         "with its adapter disabled, so it would move with them: freeze them "
                         "(p.requires_grad_(False)), list those modules in LoraConfig("
                         "modules_to_save=...), or train without LoRA (full fine-tuning).")


def _in_order(pairs: list, batch_size: int):
    for i in range(0, len(pairs), batch_size):
        yield pairs[i: i + batch_size]


class _Batches:
    """Batches of pairs forever, reshuffled each epoch by a seeded sampler (ragged tails dropped).

    With `world` processes, every process draws the same global batch of `batch_size * world`
    pairs and keeps its own `batch_size` of them (process `rank` the rank-th slice), so the pairs
    of a step do not depend on the number of processes, only on the global batch.
    Its position (the sampler's generator at the start of the epoch, and the batches taken
    since) is saved in a checkpoint and restored exactly.
    """

    def __init__(self, pairs: list, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if len(pairs) < batch_size * world:
            processes = f" x {world} processes" if world > 1 else ""
            raise ValueError(f"batch_size={batch_size}{processes} exceeds the {len(pairs)} "
                             "training pairs: lower batch_size or add data.")
        self.pairs, self.batch_size = pairs, batch_size * world
        self.mine = slice(rank * batch_size, (rank + 1) * batch_size)
        self.generator = torch.Generator().manual_seed(seed)
        self._epoch = None

    def _start_epoch(self) -> None:
        self.epoch_start, self.taken = self.generator.get_state(), 0
        sampler = RandomSampler(self.pairs, generator=self.generator)
        self._epoch = iter(BatchSampler(sampler, self.batch_size, drop_last=True))

    def __next__(self) -> list[dict]:
        if self._epoch is None:
            self._start_epoch()
        indices = next(self._epoch, None)
        if indices is None:
            self._epoch = None
            return next(self)
        self.taken += 1
        return [self.pairs[i] for i in indices[self.mine]]

    def state(self) -> dict:
        if self._epoch is None:
            self._start_epoch()
        return {"epoch_start": self.epoch_start, "taken": self.taken}

    def restore(self, state: dict) -> None:
        self.generator.set_state(state["epoch_start"])
        self._start_epoch()
        for _ in range(state["taken"]):
            next(self)


class _World:
    """This process's place in a data-parallel run; rank 0 of 1 when it runs alone.

    Under `accelerate launch` or `torchrun` (WORLD_SIZE > 1 in the environment) the process
    group is joined here unless the caller joined one: gloo for CPU tensors, NCCL for CUDA ones.
    Alone, every method returns its input untouched, so a one-process run computes exactly what
    it computed before data parallelism existed.
    """

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            dist.init_process_group("cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo")
        joined = dist.is_available() and dist.is_initialized()
        self.dist, self.rank = dist, dist.get_rank() if joined else 0
        self.size = dist.get_world_size() if joined else 1
        # NCCL moves CUDA tensors only; gloo moves CPU ones.
        nccl = joined and "nccl" in str(dist.get_backend())
        self.device = device if nccl and device.type == "cuda" else torch.device("cpu")

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the processes."""
        if self.size == 1:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(total)
        return total.tolist()

    def max(self, value: float) -> float:
        if self.size == 1:
            return value
        top = torch.tensor([value], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(top, op=self.dist.ReduceOp.MAX)
        return top.item()

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set on any process (all of them get the same answer)."""
        return flag if self.size == 1 else self.sum([float(flag)])[0] > 0

    def all_finite(self, loss: torch.Tensor) -> bool:
        """Whether every process's loss is finite: all of them stop together, or none does."""
        finite = bool(torch.isfinite(loss))
        return finite if self.size == 1 else self.sum([float(not finite)])[0] == 0

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's `tensor` (one shape everywhere), concatenated along dim 0 by rank."""
        local = tensor.to(self.device)
        parts = [torch.empty_like(local) for _ in range(self.size)]
        self.dist.all_gather(parts, local)
        return torch.cat(parts).to(tensor.device)

    @torch.no_grad()
    def average_gradients(self, params: list) -> None:
        """Replace each gradient by its mean over the processes (flat buckets, few messages).

        Each process's loss is the mean over its own pairs, so the mean of the gradients is the
        gradient of the mean over the global batch: what one process would compute on it all.
        """
        if self.size == 1:
            return
        buckets, size = [[]], 0
        for grad in (p.grad for p in params if p.grad is not None):
            if buckets[-1] and (size + grad.numel() > 2**25 or grad.dtype != buckets[-1][0].dtype):
                buckets, size = buckets + [[]], 0
            buckets[-1].append(grad)
            size += grad.numel()
        for bucket in filter(None, buckets):
            flat = torch.cat([g.reshape(-1) for g in bucket]).to(self.device)
            self.dist.all_reduce(flat)
            flat /= self.size
            for grad, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                grad.copy_(part.view_as(grad))

    @torch.no_grad()
    def broadcast(self, params: list) -> None:
        """Give every process rank 0's values (each may have drawn its own LoRA init)."""
        for p in params if self.size > 1 else ():
            value = p.detach().to(self.device)
            self.dist.broadcast(value, 0)
            p.copy_(value)


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # Process peak RSS: KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


# Unpaired KTO's metrics of desirable (chosen) or undesirable (rejected) examples alone: the
# mean over those examples, left out of a step that drew none (as TRL does).
_COUNTED = {"rewards/chosen": "count/desirable", "logps/chosen": "count/desirable",
            "rewards/rejected": "count/undesirable", "logps/rejected": "count/undesirable"}


def _mean(totals: dict, n: int) -> dict:
    """Sums over n examples -> means; with count/* (unpaired KTO), `_COUNTED` metrics are means
    over their examples and rewards/margins is their difference."""
    if "count/desirable" not in totals:
        return {key: value / n for key, value in totals.items()}
    means = {key: value / totals.get(_COUNTED.get(key), n) for key, value in totals.items()
             if not key.startswith("count/") and totals.get(_COUNTED.get(key), n)}
    if "rewards/chosen" in means and "rewards/rejected" in means:
        means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
    return means


def _add(totals: dict, sums: dict) -> None:
    for key, value in sums.items():
        totals[key] = totals.get(key, 0.0) + value


@torch.no_grad()
def _evaluate_pairs(model, tokenizer, pairs, config, reference: Reference) -> dict:
    was_training = model.training
    model.eval()
    totals = {}
    for chunk in _in_order(pairs, config.eval_batch_size):
        batch = _collate(chunk, tokenizer, config.max_length)
        policy, entropy = batch_logps(model, batch, config.dtype, with_entropy=True)
        ref = reference.logps(model, batch, config.dtype) if _needs_reference(config) else None
        if "kl" in batch:
            batch["kl_logps"] = _kl_logps(model, batch, config.dtype, reference.model)
        _add(totals, preference_step(policy, ref, batch, config)[1])
        _add(totals, {"entropy": entropy.item() * len(chunk)})
    model.train(was_training)
    return _mean(totals, len(pairs))


def shard_fsdp(model, dtype: str = "float32"):
    """Shard a model for full fine-tuning over the processes with FSDP (torch's fully_shard).

    Each decoder block (transformers' `_no_split_modules`) is one shard group and the rest
    (embeddings, final norm, head) the root: every process keeps 1/N of the float32 weights,
    gradients and AdamW state, and gathers one block at a time to compute, in `dtype` (pass
    TrainConfig.dtype: "bfloat16" gathers bfloat16 copies and reduces gradients in float32).
    Joins the process group (gloo on CPU, NCCL on CUDA) if needed; call it in every process,
    before `train`. Checkpoints and resuming are not supported under FSDP (save_steps=0).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if _is_peft(model):
        raise ValueError("shard_fsdp shards full fine-tuning; a LoRA model trains data "
                         "parallel without it (its adapters are small).")
    device = next(model.parameters()).device
    _World(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[dtype], reduce_dtype=torch.float32)
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def full_state_dict(model) -> dict | None:
    """The whole state dict of an FSDP-sharded model on rank 0 (CPU), {} elsewhere; None for a
    model that is not sharded (its own state_dict holds it). Every process must call it."""
    if not _is_fsdp(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def _needs_reference(config: TrainConfig) -> bool:
    return LOSSES[config.loss_type].needs_reference


def evaluate(model, tokenizer, data, config: TrainConfig, reference_model=None) -> dict:
    """DPO metrics on held-out pairs, without gradients, averaged over all pairs.

    Keys: loss, rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected} and
    entropy (mean next-token entropy of the policy on the responses, nats). The reference is
    the peft model with its adapter disabled, or `reference_model` if given. Like `train`, it
    runs the tanh GELU fused when config.fused_gelu is set, renders conversational rows with
    `tokenizer`'s chat template, and with config.device moves the model (and
    `reference_model`) there first. Unpaired data (loss_type="kto")
    gives KTO's metrics as `train` logs them (no accuracies; kl is z0), z0 estimated per chunk
    of eval_batch_size examples in data order (a last chunk of one borrows its own completion).
    """
    check_pad_token(tokenizer)
    _check_weights_loaded(model)
    device = _device(config, model)
    pairs = _tokenize(data, tokenizer, config, model)
    model.to(device)
    if reference_model is not None:
        reference_model.to(device)
    with _fast_activations(config, model, reference_model):
        return _evaluate_pairs(model, tokenizer, pairs, config, Reference(reference_model))


def _fast_activations(config: TrainConfig, *models) -> ExitStack:
    """`models.fused_gelu` on each model (None is skipped) when config.fused_gelu is set."""
    stack = ExitStack()
    for model in models if config.fused_gelu else ():
        if model is not None:
            stack.enter_context(fused_gelu(model))
    return stack


def train(model, tokenizer, train_data, config: TrainConfig, eval_data=None,
          resume_from=None) -> History:
    """Train `model` with a preference loss on `train_data`; returns the per-step History.

    - Everything is checked before any work: the config (on construction), the data (through
      `load_preferences`' checks, so raw rows are checked too), the tokenizer, the device, the
      model's context length and trainable parameters, and a checkpoint to resume from.
    - Reference: a peft model's adapter disabled, so no second copy of the weights. With
      `cache_reference` (default) each pair's reference log-probs are kept after their first
      pass, so from the second epoch on a step skips the reference forward. A model without an
      adapter (full fine-tuning) gets its reference log-probs computed once, before the first
      step, from its initial weights.
    - With `fused_gelu` (default) the model's Python tanh GELU runs as one fused kernel during
      training (`models.fused_gelu`; the modules are restored on return).
    - Dropout is set to 0 (in place) so step 0 is exactly the reference: loss ln 2.
    - One concatenated chosen+rejected forward per micro-batch; AdamW on trainable parameters;
      transformers' warmup + cosine/linear/constant schedule; gradient clipping; autocast (+
      GradScaler for float16).
    - Each step records loss, rewards/*, logps/*, grad_norm, learning_rate, step_seconds (wall
      time of the step, before any evaluation), tokens_per_second, peak_memory_gib; with
      eval_data, eval/* metrics every `eval_every` steps and at the end.
      Train metrics of step s come from the forward before its update, eval/* from after it;
      call evaluate() before training for the reference's values.
    - Output folder: checked before any work (see `checkpoint.check_output_dir`); one holding
      another run is refused unless `resume_from` or `config.overwrite_output_dir` (which
      deletes that run's checkpoints once every check has passed).
    - Checkpoints: with `output_dir` and `save_steps`, `output_dir/checkpoint-{n}/` after every
      `save_steps` steps and at the end (n = steps done); `save_total_limit` prunes only this
      run's. A KeyboardInterrupt or a NonFiniteLossError saves the last completed step (with
      `output_dir` set) and propagates with `.history` and `.checkpoint` attached; weights or
      optimiser state that are not finite are never written. `resume_from` (a checkpoint folder,
      or True for the newest complete one in `output_dir`) continues a run: on CPU its History
      equals the uninterrupted run's bit for bit, timing fields aside. The checkpoint must be
      this run's: the same config (a larger max_steps continues it), tokenised data, base model
      (config and weights checksum), LoRA settings, load dtype and number of processes, else
      CheckpointError names what differs; a damaged file is named with the previous checkpoint.
    - Signals: SIGINT (Ctrl-C) and SIGTERM (a scheduler) stop the run after the current step,
      the same step on every process, with a checkpoint; `.signum` on the KeyboardInterrupt
      says which. Alone, a second signal stops at once (after an update or save in progress).
    - A non-finite loss, or gradient norm (outside float16's scaler), stops training before the
      update with NonFiniteLossError naming the step, the dtype and the likely cause.
    - KTO (loss_type="kto") trains on pairs (z0 from the batch's own completions: cheaper,
      biased) or on unpaired rows (prompt, completion, label) with the paper's z0: the mean
      log-ratio, clamped at 0, of each prompt with the previous example's completion
      (`collate_unpaired`), without gradient; one z0 per micro-batch, as in TRL, averaged over
      the processes (each rotates its own share). Unpaired data needs LoRA and batch_size >= 2;
      rewards/chosen and logps/chosen average over the desirable examples, .../rejected over
      the undesirable ones (left out of a step that drew none), and kl is z0.
    - Data parallel: run under `accelerate launch` or `torchrun` with N processes (the process
      group is joined here if the caller has not). Each process takes its `batch_size` share of
      every global batch of batch_size x N pairs, the gradients are averaged over the processes
      before clipping, the metrics are averaged over the global batch, and rank 0 alone shows
      progress and writes checkpoints; the History equals a one-process run's with the same
      global batch and seed up to float rounding. Evaluation runs whole on every process.
    """
    resume_from = None if resume_from is False else resume_from
    run = _Run(model, tokenizer, train_data, config, eval_data, resume_from)
    with _fast_activations(config, model):
        return _train(run)


def _check_unpaired(config: TrainConfig, model, pairs: list, eval_pairs: list | None) -> None:
    """What unpaired KTO needs, checked before any work."""
    if _rows_per_example(pairs) == 1 and config.batch_size < 2:
        raise ValueError("unpaired KTO estimates z0 from each prompt with another example's "
                         "completion of its micro-batch, and batch_size=1 leaves none: use "
                         "batch_size >= 2 (TRL refuses 1 too).")
    if 1 in (_rows_per_example(pairs), _rows_per_example(eval_pairs)) and not _is_peft(model):
        raise ValueError("unpaired KTO needs reference log-probs of new (prompt, borrowed "
                         "completion) pairs at every step, which full fine-tuning's frozen "
                         "reference cannot give: add a LoRA adapter (add_lora(model)), or train "
                         "KTO on pairs (prompt, chosen, rejected).")


def _device(config: TrainConfig, model) -> torch.device:
    """The run's device, and a clear error where it cannot be used (before torch's own)."""
    base = (model.get_base_model() if _is_peft(model) else model).config
    context = getattr(base, "n_positions", None) or getattr(base, "max_position_embeddings", None)
    if context is not None and config.max_length > context:
        raise ValueError(f"max_length={config.max_length} exceeds the model's context of "
                         f"{context} tokens: lower max_length to at most {context}.")
    if config.device is None:
        return next(model.parameters()).device
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={config.device!r} but this machine has no CUDA GPU: use "
                         "device='cpu' (or None), or run on a GPU runtime.")
    return device


class _Run:
    """Everything a training run holds: data, references, optimiser, schedule, scaler."""

    def __init__(self, model, tokenizer, train_data, config: TrainConfig, eval_data,
                 resume_from=None):
        from transformers import get_scheduler

        # Checks first: nothing is changed or computed until all of them pass.
        check_pad_token(tokenizer)
        _check_weights_loaded(model)
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.device = _device(config, model)
        self.world, self.fsdp = _World(self.device), _is_fsdp(model)
        if self.fsdp and (config.save_steps or resume_from is not None
                          or config.dtype == "float16"):
            raise ValueError("under FSDP (shard_fsdp) this trainer has no checkpoints, no "
                             "resuming and no float16 GradScaler: set save_steps=0, drop "
                             "resume_from, and use bfloat16 or float32.")
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters: call add_lora(model) "
                             "first, or unfreeze the weights for full fine-tuning.")
        _check_adapter(model)
        if config.dtype == "float16" and any(p.dtype == torch.float16 for p in self.params):
            raise ValueError("dtype='float16' trains with autocast and a GradScaler, which needs "
                             "float32 trainable weights: load the model in float32 for full "
                             "fine-tuning, or train LoRA adapters (peft keeps them in float32).")
        if config.dtype == "float16" and self.device.type != "cuda":
            raise ValueError("dtype='float16' needs a CUDA GPU (autocast + GradScaler); on CPU "
                             "use 'float32' or 'bfloat16'.")
        check_output_dir(config.output_dir, resume=resume_from is not None,
                         overwrite=config.overwrite_output_dir)
        self.pairs = _tokenize(train_data, tokenizer, config, model)
        self.eval_pairs = (None if eval_data is None
                           else _tokenize(eval_data, tokenizer, config, model))
        _check_unpaired(config, model, self.pairs, self.eval_pairs)
        self.batches = _Batches(self.pairs, config.batch_size, config.seed, self.world.rank,
                                self.world.size)
        self.fingerprints = None if self.fsdp else fingerprints(
            model, self.pairs, self.eval_pairs, self.world.size)
        checkpoint = (None if resume_from is None
                      else _load_checkpoint(resume_from, config, self.fingerprints))
        self.run_id = uuid.uuid4().hex if checkpoint is None else checkpoint["run_id"]
        self.saved_at = None if checkpoint is None else checkpoint["steps_done"]
        foreign = _foreign_checkpoints(config, self.run_id, fresh=checkpoint is None)
        if foreign:  # all checks passed: this run replaces that one (overwrite_output_dir)
            clear_checkpoints(foreign)

        torch.manual_seed(config.seed)
        disable_dropout(model)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()  # so checkpointed blocks see inputs needing grad
        model.to(self.device).train()
        if not self.fsdp:  # FSDP shards each process's own copy
            self.world.broadcast(self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        self.scheduler = get_scheduler(SCHEDULERS[config.lr_scheduler], self.optimizer,
                                       config.warmup_steps, config.max_steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.dtype == "float16")
        self.history, self.start, self.done = History(), 0, 0
        self.stops = StopRequests(announce=self.world.rank == 0, alone=self.world.size == 1)
        if checkpoint is None:
            self.reference, self.eval_reference = self._references()
        else:
            self._restore(checkpoint)
        self.step_state = self._step_state()

    def _references(self) -> tuple[Reference, Reference]:
        config, model = self.config, self.model
        if not _is_peft(model):  # full fine-tuning: freeze the initial policy's log-probs
            return tuple(
                None if pairs is None else Reference.frozen(
                    model, self.tokenizer, pairs, config.eval_batch_size, config.dtype)
                for pairs in (self.pairs, self.eval_pairs))
        if not config.cache_reference:  # the disabled adapter at every step
            return Reference(), Reference()
        return tuple(Reference(cache=torch.full((len(pairs or []), _rows_per_example(pairs)),
                                                float("nan")))
                     for pairs in (self.pairs, self.eval_pairs))

    def micro_step(self, step: int) -> tuple[dict, int]:
        """Forward and backward on one micro-batch: (metric sums, tokens)."""
        config = self.config
        batch = _collate(next(self.batches), self.tokenizer, config.max_length)
        ref = (self.reference.logps(self.model, batch, config.dtype)
               if _needs_reference(config) else None)
        if ref is not None and self.reference.cache is not None and self.world.size > 1:
            self._share_reference(batch, ref)
        if "kl" in batch:
            batch["kl_logps"] = self._kl_logps(batch)
        policy = batch_logps(self.model, batch, config.dtype)
        losses, sums = preference_step(policy, ref, batch, config)
        loss = losses.mean() / config.gradient_accumulation_steps
        if not self.world.all_finite(loss):
            where = f" (this process's of {self.world.size})" if self.world.size > 1 else ""
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}{where}) at step {step} in a {config.dtype} "
                f"run: {_divergence_fix(config)}")
        self.scaler.scale(loss).backward()
        return sums, int(batch["attention_mask"].sum())

    def _kl_logps(self, batch: dict):
        """`_kl_logps` of the mismatched rows of every process: KTO's z0 is one mean over the
        global micro-batch (TRL gathers it likewise), each process's rows rotated within its
        own share. Per micro-batch, as in TRL: under gradient accumulation each micro-batch
        has its own z0, since its loss and backward come before the next one is drawn."""
        kl = _kl_logps(self.model, batch, self.config.dtype)
        return kl if self.world.size == 1 else tuple(self.world.gather(t) for t in kl)

    def _share_reference(self, batch: dict, logps: torch.Tensor) -> None:
        """Put every process's reference log-probs of this micro-batch in every process's cache.

        Rows are global pair indices, so the caches stay equal (rank 0 saves its own) and a
        pair drawn later by another process is not computed again.
        """
        rows = _per_example(logps, len(batch["index"])).float()
        self.reference.cache[self.world.gather(batch["index"])] = self.world.gather(rows).cpu()

    def step(self, step: int) -> dict:
        """One optimiser step over the global batch; appends its History row (metrics of all
        processes) and advances `done` and `step_state`.

        Means are over the global batch's pairs: every process has the same number of them.
        The update and its record are done as one: a stop signal waits until both are.
        """
        config, start, tokens, totals = self.config, time.perf_counter(), 0, {}
        for _ in range(config.gradient_accumulation_steps):
            sums, n_tokens = self.micro_step(step)
            _add(totals, sums)
            tokens += n_tokens
        with self.stops.deferred():
            grad_norm, lr = self.update()
            seconds = time.perf_counter() - start
            *values, tokens = self.world.sum([*totals.values(), tokens])
            pairs = config.batch_size * config.gradient_accumulation_steps * self.world.size
            row = {"step": step, **_mean(dict(zip(totals, values)), pairs),
                   "grad_norm": grad_norm, "learning_rate": lr, "step_seconds": seconds,
                   "tokens_per_second": tokens / seconds,
                   "peak_memory_gib": self.world.max(_peak_memory_gib(self.device))}
            self.history.append(row)
            self.done, self.step_state = step + 1, self._step_state()
        return row

    def update(self) -> tuple[float, float]:
        """Average the gradients over the processes, clip, step the optimiser and the schedule:
        (grad norm, the learning rate used)."""
        # Before unscaling: an overflow on one process then reaches all, and all skip the step.
        if not self.fsdp:  # FSDP averages (reduce-scatters) them in the backward pass
            self.world.average_gradients(self.params)
        self.scaler.unscale_(self.optimizer)
        max_norm = self.config.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm or math.inf)
        lr = self.scheduler.get_last_lr()[0]
        if not self.scaler.is_enabled() and not torch.isfinite(grad_norm):
            # float16's scaler skips such a step by design; in any other dtype it would write
            # NaN into every weight, so the run stops before the update.
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"non-finite gradient norm ({grad_norm.item()}) at step {len(self.history)}, with "
                f"a finite "
                f"loss, in a {self.config.dtype} run: {_divergence_fix(self.config)}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, the same on every process
            grad_norm = grad_norm.full_tensor()
        return grad_norm.item(), lr

    def evaluation_due(self, step: int) -> bool:
        every, last = self.config.eval_every, step == self.config.max_steps - 1
        return self.eval_pairs is not None and (last or bool(every and step % every == 0))

    def evaluate(self) -> dict:
        metrics = _evaluate_pairs(self.model, self.tokenizer, self.eval_pairs, self.config,
                                  self.eval_reference)
        return {f"eval/{key}": value for key, value in metrics.items()}


    # -- checkpoints ------------------------------------------------------------------------

    def _step_state(self) -> dict:
        """What a step starts from, beyond the weights and optimiser: data position and RNG."""
        return {"batches": self.batches.state(), "rng": torch.get_rng_state()}

    def _trainable(self) -> dict:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def save(self, steps_done: int) -> Path | None:
        """Write output_dir/checkpoint-{steps_done}/ (atomically) and prune this run's old ones.

        Only rank 0 writes (every process holds the same state); the others return None.
        Non-finite weights or optimiser state are never written: every process raises
        NonFiniteLossError instead, and the newest finite checkpoint stays.
        """
        from safetensors.torch import save_file

        root = Path(self.config.output_dir)
        weights = {n: p.detach().cpu().contiguous() for n, p in self._trainable().items()}
        optimizer = self.optimizer.state_dict()
        if not (all_finite(weights) and all_finite(optimizer["state"])):
            newest = checkpoints(root)
            raise NonFiniteLossError(
                f"the weights or optimiser state became non-finite by step {steps_done}, so no "
                f"checkpoint was written (the newest finite one: "
                f"{newest[-1] if newest else 'none'}): {_divergence_fix(self.config)}")
        if self.world.rank != 0:
            return None
        final, tmp = root / f"checkpoint-{steps_done}", root / f"checkpoint-{steps_done}.tmp"
        with self.stops.deferred():  # a half-written checkpoint is never left as the newest
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(weights, tmp / "trainable.safetensors")
            caches = {"reference": self.reference.cache,
                      "eval_reference": getattr(self.eval_reference, "cache", None)}
            torch.save({"steps_done": steps_done, "optimizer": optimizer,
                        "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict(), "caches": caches,
                        "world_size": self.world.size, **self.step_state}, tmp / "state.pt")
            (tmp / "config.json").write_text(json.dumps(asdict(self.config), indent=1))
            self.history.to_json(tmp / "history.json")
            if _is_peft(self.model):  # loadable with load_adapter, too
                save_adapter(self.model, tmp / "adapter")
            # Written last: a folder without it is incomplete and is never resumed from.
            (tmp / STATE_FILE).write_text(json.dumps(
                {"steps_done": steps_done, "run_id": self.run_id, "finite": True,
                 "fingerprints": self.fingerprints}, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self.saved_at = steps_done
            limit = self.config.save_total_limit
            for old in (checkpoints(root, self.run_id)[:-limit] if limit else []):
                shutil.rmtree(old)
        return final

    def _restore(self, checkpoint: dict) -> None:
        weights, trainable = checkpoint["weights"], self._trainable()
        path, state = checkpoint["path"], checkpoint["state"]
        if set(weights) != set(trainable) or any(
                weights[n].shape != p.shape for n, p in trainable.items()):
            raise CheckpointError(f"{path} holds trainable weights of another model (names or "
                                  "shapes differ): resume with the model and adapter settings "
                                  "it was trained with.")
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(weights[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.batches.restore(state["batches"])
        torch.set_rng_state(state["rng"])
        self.reference = Reference(cache=state["caches"]["reference"])
        self.eval_reference = Reference(cache=state["caches"]["eval_reference"])
        if self.eval_pairs is not None and self.eval_reference.cache is None and not _is_peft(
                self.model):
            raise CheckpointError(f"{path} was saved without eval_data; its full fine-tuning "
                                  "run has no frozen reference for it: resume without "
                                  "eval_data.")
        self.history = checkpoint["history"]
        self.start = self.done = state["steps_done"]


# Settings that may differ between a run and its resumption: they do not change the steps
# already taken. A larger max_steps continues the run (the schedule is stretched to it from
# the current step, as in TRL).
_RESUMABLE = {"progress", "output_dir", "save_steps", "save_total_limit", "device", "eval_every",
              "eval_batch_size", "logging_steps", "overwrite_output_dir", "max_steps"}


def _foreign_checkpoints(config: TrainConfig, run_id: str, fresh: bool) -> list[Path]:
    """Checkpoint folders in output_dir that are not this run's: refused, or with
    overwrite_output_dir the ones to delete (a fresh run replaces every one of them)."""
    if config.output_dir is None or not Path(config.output_dir).is_dir():
        return []
    found = [p for p in Path(config.output_dir).glob("checkpoint-*") if p.is_dir()]
    foreign = found if fresh else [p for p in found
                                   if (read_state(p) or {}).get("run_id") not in (None, run_id)]
    if foreign and not config.overwrite_output_dir:
        raise CheckpointError(f"output_dir {config.output_dir!r} holds another run's checkpoints "
                              f"({', '.join(sorted(p.name for p in foreign)[:4])}), which this "
                              "run would overwrite: resume into the folder of the checkpoint, "
                              "choose another output_dir, or replace them with --overwrite "
                              "(overwrite_output_dir=True).")
    return foreign


def _checkpoint_path(resume_from, config: TrainConfig) -> Path:
    """The checkpoint folder to resume: `resume_from`, or with True the newest complete and
    finite one in output_dir."""
    if resume_from is True:
        found = checkpoints(config.output_dir) if config.output_dir is not None else []
        if not found:
            raise CheckpointError(f"resume_from=True but output_dir={config.output_dir!r} holds "
                                  "no checkpoint-{step}/ folder that is complete: pass a "
                                  "checkpoint path, or start without resume_from.")
        return found[-1]
    path = Path(resume_from).expanduser()
    if read_state(path) is None:
        if (path / "state.pt").is_file():
            raise unreadable(path, STATE_FILE, FileNotFoundError("missing"))
        raise CheckpointError(f"resume_from={str(resume_from)!r} is not a checkpoint folder (no "
                              f"{STATE_FILE} in it): pass a checkpoint-{{step}}/ folder written "
                              "by train.")
    return path


def _load_checkpoint(resume_from, config: TrainConfig, now: dict | None) -> dict:
    """Everything a resume needs, read and checked against this run before any work: the
    config, the fingerprints (data, base model, LoRA, load dtype, processes), the files."""
    from safetensors.torch import load_file

    path = _checkpoint_path(resume_from, config)
    trainer_state = read_state(path)
    try:
        saved = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise unreadable(path, "config.json", err) from None
    defaults = asdict(TrainConfig())  # a field added since the checkpoint was written: default
    changed = {k: (saved.get(k, defaults[k]), v) for k, v in asdict(config).items()
               if k not in _RESUMABLE and saved.get(k, defaults[k]) != v}
    if changed:
        raise CheckpointError(f"{path} was written with other settings {changed} (saved, now): "
                              "resume with the config it was trained with.")
    steps_done = trainer_state["steps_done"]
    if config.max_steps < steps_done:
        raise CheckpointError(f"{path} has {steps_done} steps done, more than max_steps="
                              f"{config.max_steps}: set max_steps >= {steps_done} to continue "
                              "the run, or resume from an earlier checkpoint.")
    changes = [] if now is None else changed_fingerprints(trainer_state.get("fingerprints", {}),
                                                           now)
    if changes:
        raise CheckpointError(f"{path} is another run's: {'; '.join(changes)}. Resume with the "
                              "model, data and settings it was trained with, or start a new run "
                              "(another output_dir, or overwrite_output_dir=True).")
    loaded = {"path": path, "run_id": trainer_state["run_id"], "steps_done": steps_done}
    for key, name, read in (("weights", "trainable.safetensors", load_file),
                            ("state", "state.pt", lambda f: torch.load(f, weights_only=True)),
                            ("history", "history.json", History.from_json)):
        try:
            loaded[key] = read(path / name)
        except Exception as err:  # noqa: BLE001 - truncated, damaged, missing: all named
            raise unreadable(path, name, err) from None
    return loaded


# What a progress line shows of a History row, where the row has it: name -> (key, format).
_SHOWN = {"loss": ("loss", ".4f"), "acc": ("rewards/accuracies", ".3f"),
          "margin": ("rewards/margins", ".4f"), "kl": ("kl", ".4f")}


def _shown(row: dict) -> dict:
    return {name: format(row[key], form) for name, (key, form) in _SHOWN.items() if key in row}


def metrics_line(row: dict, max_steps: int) -> str:
    """One History row as a line of text: step, loss, accuracy, margin (KTO on unpaired data:
    margin and kl, its z0), lr, speed, eval loss."""
    line = f"step {row['step'] + 1}/{max_steps}"
    line += "".join(f"  {name} {value}" for name, value in _shown(row).items())
    line += f"  lr {row['learning_rate']:.2e}  {row['tokens_per_second']:.0f} tok/s"
    if "eval/loss" in row:
        line += f"  eval loss {row['eval/loss']:.4f}"
        if "eval/rewards/accuracies" in row:
            line += f" acc {row['eval/rewards/accuracies']:.3f}"
    return line


def _train(run: _Run) -> History:
    """The loop: per step, accumulate micro-batches, update, record, evaluate, checkpoint.

    Every process runs it; rank 0 alone shows the progress bar, prints and writes checkpoints.
    A stop signal (SIGINT, SIGTERM) ends the loop after the step every process agrees on.
    """
    config, history, main = run.config, run.history, run.world.rank == 0
    bar = tqdm(range(run.start, config.max_steps), desc="DPO", initial=run.start,
               total=config.max_steps, disable=not (config.progress and main))
    try:
        with run.stops:
            if run.start and run.evaluation_due(run.start - 1) and not any(
                    key.startswith("eval/") for key in history[-1]):
                history[-1].update(run.evaluate())  # it was interrupted: as if it never was
            for step in bar:
                run.step(step)
                if run.world.any(run.stops.requested):  # every process stops after this step
                    raise KeyboardInterrupt
                if run.evaluation_due(step):
                    history[-1].update(run.evaluate())
                bar.set_postfix(_shown(history[-1]))
                if main and config.logging_steps and run.done % config.logging_steps == 0:
                    tqdm.write(metrics_line(history[-1], config.max_steps))
                if config.save_steps and (run.done % config.save_steps == 0
                                          or run.done == config.max_steps):
                    run.save(run.done)
                if run.world.any(run.stops.requested):  # a signal in the evaluation or save
                    raise KeyboardInterrupt
    except (KeyboardInterrupt, NonFiniteLossError) as err:
        # Keep what was done: the state after the last update, with the data position and RNG
        # its successor began with (an unfinished step's gradients are dropped).
        run.optimizer.zero_grad(set_to_none=True)
        err.history, err.signum, err.checkpoint = history, run.stops.signum, None
        if config.output_dir is not None and run.done > run.start and not run.fsdp:
            if run.saved_at != run.done:
                try:
                    run.save(run.done)
                except NonFiniteLossError as poisoned:
                    if isinstance(err, KeyboardInterrupt):
                        raise poisoned from err
            if run.saved_at == run.done and main:
                err.checkpoint = Path(config.output_dir) / f"checkpoint-{run.done}"
        raise
    run.model.eval()
    return history
