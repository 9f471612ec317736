"""The objective: where pi_ref's log-probs come from (`Reference`), one step of the loss with
TRL's metrics (`preference_step`), and evaluation on held-out pairs."""

import torch

from .batching import collate_pairs, collate_unpaired
from .config import TrainConfig
from .logprobs import PairLogps, _is_peft, as_pair, batch_logps, row_logps
from .losses import LOSS_TYPES, LOSSES, dpo_loss, kto_loss


def disable_dropout(model, p: float = 0.0) -> None:
    """Set every dropout probability to 0 (in place), as TRL does for DPO; or to `p`.

    With dropout the policy would differ from the reference at step 0 by noise alone; without
    it the first loss is exactly ln 2. `p` > 0 (`TrainConfig.dropout`) puts the same
    probability in every `torch.nn.Dropout` module, a regulariser for full fine-tuning.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p


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
    def logps(self, policy, batch: dict, dtype: str = "float32"):
        """log pi_ref of the batch, on the policy's device: a `PairLogps` of a pair batch, (B,)
        of an unpaired one."""
        if self.cache is not None:
            cached = self.cache[batch["index"]]
            if not cached.isnan().any():
                cached = cached.to(next(policy.parameters()).device)
                return PairLogps(*cached.unbind(1)) if cached.shape[1] == 2 else cached[:, 0]
        logps = as_pair(self.rows(policy, batch, dtype), batch)
        if self.cache is not None:
            self._store(batch, logps)
        return logps

    @torch.no_grad()
    def rows(self, policy, batch: dict, dtype: str = "float32") -> torch.Tensor:
        """log pi_ref of every row of `batch` (`row_logps`), never cached."""
        if self.model is not None:
            return row_logps(self.model, batch, dtype)
        if _is_peft(policy):
            with policy.disable_adapter():
                return row_logps(policy, batch, dtype)
        raise ValueError("no reference: pass a peft model (its adapter is disabled for the "
                         "reference), a reference model, or a frozen cache.")

    def _store(self, batch: dict, logps) -> None:
        self.cache[batch["index"]] = _per_example(logps).float().cpu()


def _per_example(logps) -> torch.Tensor:
    """A `PairLogps` -> (B, 2), one row a pair; unpaired (B,) -> (B, 1)."""
    return torch.stack(tuple(logps), 1) if isinstance(logps, PairLogps) else logps[:, None]


def _rows_per_example(pairs: list[dict]) -> int:
    """Forward rows an example takes: 2 for a pair (chosen, rejected), 1 for unpaired data."""
    return 1 if pairs and "completion_ids" in pairs[0] else 2


def _needs_reference(config: TrainConfig) -> bool:
    return LOSSES[config.loss_type].needs_reference


def preference_step(policy_logps: PairLogps, reference_logps: PairLogps | None,
                    batch: dict, config: TrainConfig) -> tuple[torch.Tensor, dict]:
    """One step of the objective: per-pair losses (B,) and the batch's metric sums.

    `policy_logps` and `reference_logps` hold the batch's chosen and rejected log-probs, each
    (B,) (`reference_logps` may be None for a loss that needs none, SimPO, ORPO and "sft").
    The DPO family (`losses.LOSS_TYPES`) is `dpo_loss` itself; for DPO (Eq 7 of the paper)
    -log sigma(beta [log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l)]). KTO, ORPO and
    Preferred-FT come from `LOSSES[config.loss_type]`. The sums use TRL's metric names, and
    `metric_means(sums, n)` turns them into means. Non-finite log-probs (a diverged run) give
    NaN losses, which the trainer reports, where `dpo_loss` would refuse its inputs.

    An unpaired batch (`collate_unpaired`, with `label`) trains KTO: the log-probs are (B,),
    one per example, `batch["kl_logps"]` the (policy, reference) log-probs of its mismatched
    rows, which estimate z0 (absent: z0 = 0), and the losses are `kto_loss`'s (B,).
    """
    if "label" in batch:
        return _kto_step(policy_logps, reference_logps, batch, config)
    policy, reference = policy_logps, reference_logps
    lengths = PairLogps.from_rows(batch["loss_mask"].sum(-1).to(policy.chosen.device).float())
    if not all(torch.isfinite(t).all() for t in (*policy, *(reference or ()))):
        nan = policy.chosen * float("nan")
        losses, chosen_r, rejected_r = nan, nan.detach(), nan.detach()
    elif config.loss_type in LOSS_TYPES:
        if reference is None:  # simpo: no reference; its formula does not read one
            reference = PairLogps(torch.zeros_like(policy.chosen), torch.zeros_like(policy.chosen))
        losses, chosen_r, rejected_r = dpo_loss(
            policy.chosen, policy.rejected, reference.chosen, reference.rejected,
            beta=config.beta, loss_type=config.loss_type, label_smoothing=config.label_smoothing,
            chosen_lengths=lengths.chosen, rejected_lengths=lengths.rejected,
            simpo_gamma=config.simpo_gamma)
    else:
        losses, chosen_r, rejected_r = LOSSES[config.loss_type].fn(
            policy, reference, lengths, config)
    sums = {
        "loss": losses.detach().sum().item(),
        "rewards/chosen": chosen_r.sum().item(),
        "rewards/rejected": rejected_r.sum().item(),
        "rewards/accuracies": (chosen_r > rejected_r).float().sum().item(),  # strict wins
        "rewards/margins": (chosen_r - rejected_r).sum().item(),
        "logps/chosen": policy.chosen.detach().sum().item(),
        "logps/rejected": policy.rejected.detach().sum().item(),
    }
    return losses, sums


def _kto_step(policy_logps, reference_logps, batch, config):
    """`preference_step` on unpaired examples. As TRL does, rewards/chosen and logps/chosen
    sum over the desirable examples and .../rejected over the undesirable ones (counted under
    count/*, so that `metric_means` divides by those counts); kl sums z0, once per example."""
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
def kl_logps(model, batch: dict, dtype: str = "float32", reference_model=None):
    """(policy, reference) log-probs (B,) of an unpaired batch's mismatched rows, batch["kl"].

    Without gradient, as in TRL: z0 is detached, so these rows need no backward pass. Their
    reference is computed each time (never cached): which completion a prompt borrows depends
    on the batch it was drawn in.
    """
    return (row_logps(model, batch["kl"], dtype),
            Reference(reference_model).rows(model, batch["kl"], dtype))


def _in_order(pairs: list, batch_size: int):
    for i in range(0, len(pairs), batch_size):
        yield pairs[i: i + batch_size]


# Unpaired KTO's metrics of desirable (chosen) or undesirable (rejected) examples alone: the
# mean over those examples, left out of a step that drew none (as TRL does).
_COUNTED = {"rewards/chosen": "count/desirable", "logps/chosen": "count/desirable",
            "rewards/rejected": "count/undesirable", "logps/rejected": "count/undesirable"}


def metric_means(totals: dict, n: int) -> dict:
    """`preference_step`'s metric sums over n examples -> their means, as History rows hold them.

    With count/* (unpaired KTO), each `_COUNTED` metric is a mean over its own examples (the
    desirable ones, or the undesirable ones) and rewards/margins is their difference.
    """
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
            batch["kl_logps"] = kl_logps(model, batch, config.dtype, reference.model)
        _add(totals, preference_step(policy, ref, batch, config)[1])
        _add(totals, {"entropy": entropy.item() * len(chunk)})
    model.train(was_training)
    return metric_means(totals, len(pairs))


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
