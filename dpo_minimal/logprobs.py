"""Per-sequence log-probabilities of the response tokens."""

from contextlib import nullcontext
from typing import NamedTuple

import torch


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    average: bool = False,
) -> torch.Tensor:
    """log pi(y | x) = sum_t log pi(y_t | x, y_<t) over the response tokens of each row.

    Args:
        logits: (B, T, V) model outputs; position t predicts token t + 1.
        labels: (B, T) input token ids.
        loss_mask: (B, T) 1 where the token is a response token (trained), 0 for prompt/padding.
        average: divide by the number of response tokens (the length-normalised variant;
            the paper and TRL sum, which is the default).

    Returns:
        (B,) float32 log-probabilities.

    Only the response positions are sent through log-softmax, in float32, so the cost and memory
    follow the number of response tokens rather than B * T * V, and the value of a row does not
    depend on padding or on the other rows of the batch.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or loss_mask.shape != labels.shape:
        raise ValueError(
            f"expected logits (B, T, V) with labels and loss_mask (B, T); got "
            f"{tuple(logits.shape)}, {tuple(labels.shape)}, {tuple(loss_mask.shape)}."
        )
    mask = loss_mask[:, 1:].bool()
    picked = logits[:, :-1][mask]  # (N, V): only positions that predict a response token
    return response_logps(picked, labels[:, 1:][mask], mask, average=average)


def response_logps(
    picked_logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    average: bool = False,
) -> torch.Tensor:
    """`sequence_logps` from the logits at the response positions only.

    Args:
        picked_logits: (N, V) logits of the N positions where `mask` is 1, in row-major order,
            i.e. `logits[:, :-1][mask]`; a caller can apply the LM head to those positions alone.
        targets: (N,) the tokens they predict, `labels[:, 1:][mask]`.
        mask: (B, T-1) bool, the shifted loss mask `loss_mask[:, 1:]`.
        average: divide each row's sum by its number of response tokens.

    Returns:
        (B,) float32 log-probabilities, equal to `sequence_logps` on the full logits.
    """
    picked = picked_logits.float()
    token_logps = picked.gather(-1, targets[:, None]).squeeze(-1) - picked.logsumexp(-1)
    # Scatter back to (B, T-1) and sum per row: deterministic on CPU and CUDA alike.
    per_token = torch.zeros(mask.shape, dtype=torch.float32, device=picked.device)
    sums = per_token.masked_scatter(mask, token_logps).sum(-1)
    if average:
        counts = mask.sum(-1)
        if (counts == 0).any():
            raise ValueError("a row has no response tokens, so its average log-prob is undefined.")
        sums = sums / counts
    return sums


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def _is_fsdp(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without torch.distributed
        return False
    return isinstance(model, FSDPModule)


def response_logits(model, input_ids, attention_mask, mask) -> torch.Tensor:
    """(N, V) logits at the N positions where `mask` (B, T-1) is set: `logits[:, :-1][mask]`.

    Where the architecture's logits are exactly lm_head(last hidden state) (its registry entry
    says so) and any adapter is LoRA, the head is applied to those positions only: the
    (B, T, V) logits, the largest activation of a small model, are never built, nor their
    gradient. Other models go through their own forward, and so does a model sharded by FSDP,
    whose forward hooks gather the shards (the shortcut would skip the root's embeddings and head).
    """
    from .models import has_plain_head

    base = model.get_base_model() if _is_peft(model) else model
    plain = not _is_fsdp(model) and has_plain_head(base) and (
        not _is_peft(model) or all(c.peft_type == "LORA" for c in model.peft_config.values()))
    if not plain:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits[:, :-1][mask]
    body = getattr(base, base.base_model_prefix)  # GPT2Model / PhiModel, LoRA layers inside
    hidden = body(input_ids=input_ids, attention_mask=attention_mask,
                  use_cache=False).last_hidden_state
    return base.get_output_embeddings()(hidden[:, :-1][mask])


class PairLogps(NamedTuple):
    """Summed log-probs of a batch's chosen and rejected responses, each (B,): the pair every
    loss takes (`dpo_loss(policy.chosen, policy.rejected, reference.chosen, ...)`)."""

    chosen: torch.Tensor
    rejected: torch.Tensor

    @classmethod
    def from_rows(cls, rows: torch.Tensor) -> "PairLogps":
        """Split (2B,) rows of a collated pair batch (chosen rows first) into the pair."""
        b = rows.shape[0] // 2
        return cls(rows[:b], rows[b:])


def row_logps(model, batch: dict, dtype: str = "float32", with_entropy: bool = False):
    """Summed response log-probs of every row of a collated batch, in one forward pass.

    Args:
        model: a causal LM (peft-wrapped or not), on the device the batch is moved to.
        batch: `collate_pairs` output (input_ids, attention_mask, loss_mask, each (2B, T): the
            chosen rows, then the rejected ones) or `collate_unpaired` output (B rows).
        dtype: compute dtype under autocast, "float32" (none), "float16" or "bfloat16".
        with_entropy: also return the mean next-token entropy (nats) at response positions.

    Returns:
        (rows,) float32 log pi(y | x), equal to
        `sequence_logps(model(...).logits, input_ids, loss_mask)`. With `with_entropy`, a pair
        (logps, entropy).
    """
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    mask = batch["loss_mask"].to(device)[:, 1:].bool()
    autocast = (torch.autocast(device_type=device.type, dtype=DTYPES[dtype])
                if dtype != "float32" else nullcontext())
    with autocast:
        picked = response_logits(model, input_ids, batch["attention_mask"].to(device), mask)
    logps = response_logps(picked, input_ids[:, 1:][mask], mask)
    if not with_entropy:
        return logps
    log_probs = picked.float().log_softmax(-1)
    return logps, -(log_probs.exp() * log_probs).sum(-1).mean()


def is_paired(batch: dict) -> bool:
    """A `collate_pairs` batch (chosen and rejected rows), not an unpaired one (KTO's)."""
    return "label" not in batch


def as_pair(rows: torch.Tensor, batch: dict):
    """`rows` of `batch` as a `PairLogps` for a pair batch; unpaired rows stay (B,)."""
    return PairLogps.from_rows(rows) if is_paired(batch) else rows


def batch_logps(model, batch: dict, dtype: str = "float32", with_entropy: bool = False):
    """Log-probs of a collated pair batch's chosen and rejected responses, in one forward pass.

    The rows are computed together (`row_logps`) and split here, once.

    Returns:
        `PairLogps(chosen, rejected)`, each (B,) float32 summed log pi(y | x); for an unpaired
        batch (`collate_unpaired`), its (B,) rows. With `with_entropy`, a pair
        (logps, mean next-token entropy at response positions).
    """
    if with_entropy:
        rows, entropy = row_logps(model, batch, dtype, with_entropy=True)
        return as_pair(rows, batch), entropy
    return as_pair(row_logps(model, batch, dtype), batch)
