"""The DPO loss and its family, from per-sequence log-probabilities."""

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "simpo", "unweighted")  # dpo_loss's forms
_NEEDS_LENGTHS = ("ipo", "simpo")
_NO_REFERENCE = ("simpo",)  # its reward is the average log-likelihood itself


def _check(tensors: dict, loss_type: str, beta: float, label_smoothing: float) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}: use one of {', '.join(LOSS_TYPES)} "
                         "(kto_loss and orpo_loss are functions of their own).")
    check_loss_settings(loss_type, beta, label_smoothing)
    _check_shapes(tensors)


def _check_shapes(tensors: dict) -> None:
    """All given (non-None) inputs are finite float tensors, 1-D, of one shape (B,), B >= 1."""
    given = {name: t for name, t in tensors.items() if t is not None}
    for name, t in given.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B,), got "
                            f"{type(t).__name__}: wrap it with torch.tensor(...).")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor (log-probs), got {t.dtype}.")
    shapes = {name: tuple(t.shape) for name, t in given.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(f"all inputs must be 1-D tensors of the same shape (B,), got {shapes}.")
    if first[0] == 0:
        raise ValueError("the inputs are empty (B = 0): a loss needs at least one pair, B >= 1.")
    for name, t in given.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} holds NaN or inf values, which would make every loss "
                             "non-finite: check the log-probs (an fp16 overflow?) first.")


def _check_lengths(chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor) -> None:
    if (chosen_lengths <= 0).any() or (rejected_lengths <= 0).any():
        raise ValueError("chosen_lengths and rejected_lengths must be positive.")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example preference losses and implicit rewards.

    Args:
        policy_chosen_logps: (B,) summed log pi_theta(y_w | x) over response tokens.
        policy_rejected_logps: (B,) summed log pi_theta(y_l | x).
        reference_chosen_logps: (B,) summed log pi_ref(y_w | x).
        reference_rejected_logps: (B,) summed log pi_ref(y_l | x).
        beta: KL weight; larger keeps the policy closer to the reference.
        loss_type: with h = (pi_c - ref_c) - (pi_r - ref_r) and eps = label_smoothing,
            "sigmoid"    -(1-eps) log sig(beta h) - eps log sig(-beta h)     DPO Eq 7; cDPO if eps>0
            "robust"     (-(1-eps) log sig(beta h) + eps log sig(-beta h)) / (1 - 2 eps)   rDPO
            "ipo"        (h_avg - 1/(2 beta))^2, h_avg from per-token averaged log-ratios  IPO
            "hinge"      relu(1 - beta h)                                   SLiC-style hinge
            "simpo"      -log sig(beta (pi_c/|y_w| - pi_r/|y_l|) - simpo_gamma), no reference
            "unweighted" -(pi_c - pi_r): DPO's gradient without its sigma weight (teaching only)
        label_smoothing: eps in [0, 0.5), for "sigmoid" and "robust".
        chosen_lengths, rejected_lengths: (B,) response token counts; required by ipo, simpo.
        simpo_gamma: SimPO's target margin gamma.

    Returns:
        losses (B,), chosen_rewards (B,), rejected_rewards (B,). The rewards are the detached
        implicit rewards beta * (log pi - log pi_ref); per-token averaged for ipo, and
        beta * log pi / |y| for simpo (it has no reference).
    """
    tensors = dict(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    _check(tensors, loss_type, beta, label_smoothing)
    if loss_type in _NEEDS_LENGTHS and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss_type={loss_type!r} averages per token: pass chosen_lengths "
                         "and rejected_lengths (response token counts).")
    if chosen_lengths is not None and rejected_lengths is not None:
        _check_lengths(chosen_lengths, rejected_lengths)
    eps = label_smoothing
    chosen_ratio = policy_chosen_logps - reference_chosen_logps  # log pi/pi_ref (y_w)
    rejected_ratio = policy_rejected_logps - reference_rejected_logps  # log pi/pi_ref (y_l)
    if loss_type in _NEEDS_LENGTHS:
        if loss_type == "ipo":
            chosen_ratio = chosen_ratio / chosen_lengths
            rejected_ratio = rejected_ratio / rejected_lengths
        else:  # simpo: the average log-likelihood itself is the reward
            chosen_ratio = policy_chosen_logps / chosen_lengths
            rejected_ratio = policy_rejected_logps / rejected_lengths
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        # logsigmoid, not log(sigmoid): finite for |beta h| up to 1e4 and beyond.
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = -(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)
        losses = losses / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "simpo":
        losses = -F.logsigmoid(beta * h - simpo_gamma)
    else:  # unweighted
        losses = -(policy_chosen_logps - policy_rejected_logps)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    policy_kl_logps: torch.Tensor | None = None,
    reference_kl_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024): a loss for unpaired thumbs-up / thumbs-down examples.

    With the implicit reward r = log pi_theta(y|x) - log pi_ref(y|x) and a reference point z0,

        v(x, y) = lambda_d * sigma(beta (r - z0))   if y is desirable
                  lambda_u * sigma(beta (z0 - r))   if y is undesirable
        loss    = lambda_y - v(x, y)                (lambda_y: lambda_d or lambda_u)

    z0 estimates KL(pi_theta || pi_ref): the mean log-ratio over mismatched completions
    (y' drawn for other prompts), clamped at 0 and detached, so it only shifts the value
    function and passes no gradient, as in the paper and TRL.

    Args:
        policy_logps: (B,) summed log pi_theta(y | x).
        reference_logps: (B,) summed log pi_ref(y | x).
        desirable: (B,) bool, True for a thumbs-up example, False for thumbs-down.
        policy_kl_logps, reference_kl_logps: (M,) log-probs of the mismatched completions
            under the policy and the reference. Both None means z0 = 0.
        beta: KL weight, as in DPO.
        lambda_d, lambda_u: weights of desirable and undesirable examples (> 0; TRL's
            desirable_weight and undesirable_weight); the paper picks them so that
            lambda_d n_d / (lambda_u n_u) is in [1, 4/3].

    Returns:
        losses (B,), rewards (B,) = beta * r detached, z0 (a 0-d tensor).
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}: beta is the KL weight (try 0.1).")
    if not (lambda_d > 0 and lambda_u > 0):
        raise ValueError(f"lambda_d and lambda_u must be > 0, got {lambda_d}, {lambda_u}.")
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor (True = thumbs-up), got "
                         f"{desirable.dtype}.")
    if policy_logps.dim() != 1 or not (
            policy_logps.shape == reference_logps.shape == desirable.shape):
        raise ValueError("policy_logps, reference_logps and desirable must be 1-D of one shape "
                         f"(B,), got {tuple(policy_logps.shape)}, {tuple(reference_logps.shape)}, "
                         f"{tuple(desirable.shape)}.")
    if (policy_kl_logps is None) != (reference_kl_logps is None):
        raise ValueError("pass both policy_kl_logps and reference_kl_logps, or neither.")
    if policy_kl_logps is None:
        z0 = policy_logps.new_zeros(())
    else:
        if policy_kl_logps.shape != reference_kl_logps.shape or policy_kl_logps.dim() != 1:
            raise ValueError("policy_kl_logps and reference_kl_logps must be 1-D of one shape.")
        z0 = (policy_kl_logps - reference_kl_logps).mean().clamp(min=0).detach()
    r = policy_logps - reference_logps
    value = torch.where(desirable, lambda_d * torch.sigmoid(beta * (r - z0)),
                        lambda_u * torch.sigmoid(beta * (z0 - r)))
    lambdas = torch.where(desirable, torch.full_like(r, lambda_d), torch.full_like(r, lambda_u))
    return lambdas - value, beta * r.detach(), z0


def _log1m_exp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0, accurate at both ends (Maechler 2012)."""
    return torch.where(a > -0.6931471805599453, torch.log(-torch.expm1(a)),
                       torch.log1p(-torch.exp(a)))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    lambda_or: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al. 2024): SFT and preference alignment in one loss, with no reference.

    With the per-token average log-likelihood a = log pi_theta(y|x) / |y|, p = exp(a) and
    log odds(y|x) = log p - log(1 - p),

        L = NLL_chosen - lambda_or * log sigma(log odds(y_w|x) - log odds(y_l|x)),
        NLL_chosen = -log pi_theta(y_w|x) / |y_w|.

    The NLL term is the SFT stage; the odds-ratio term pushes the rejected response down.

    Args:
        policy_chosen_logps: (B,) summed log pi_theta(y_w | x) over response tokens.
        policy_rejected_logps: (B,) summed log pi_theta(y_l | x).
        chosen_lengths, rejected_lengths: (B,) response token counts (> 0).
        lambda_or: weight of the odds-ratio term (> 0; the paper uses 0.1 to 1).

    Returns:
        losses (B,), log_odds_ratio (B,) = log odds(y_w) - log odds(y_l) detached, and
        nll (B,) = NLL_chosen detached.
    """
    if not lambda_or > 0:
        raise ValueError(f"lambda_or must be > 0, got {lambda_or}.")
    _check_shapes(dict(policy_chosen_logps=policy_chosen_logps,
                       policy_rejected_logps=policy_rejected_logps,
                       chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths))
    _check_lengths(chosen_lengths, rejected_lengths)
    if (policy_chosen_logps > 0).any() or (policy_rejected_logps > 0).any():
        raise ValueError("ORPO needs log-probabilities, which are <= 0; a positive value (logits "
                         "or probabilities passed by mistake?) would make log(1 - p) NaN.")
    chosen_avg = policy_chosen_logps / chosen_lengths  # log p_w, < 0
    rejected_avg = policy_rejected_logps / rejected_lengths  # log p_l
    log_odds = (chosen_avg - _log1m_exp(chosen_avg)) - (rejected_avg - _log1m_exp(rejected_avg))
    nll = -chosen_avg
    losses = nll - lambda_or * F.logsigmoid(log_odds)
    return losses, log_odds.detach(), nll.detach()


@dataclass(frozen=True)
class PreferenceLoss:
    """One entry of the loss registry: what `train` needs to know of a loss.

    `fn(policy, reference, lengths, config)` takes the chosen and rejected log-probs of the
    policy and of the reference (`logprobs.PairLogps`, each (B,); `reference` is None when the
    loss needs none) and the response lengths as a pair, with the settings (a `TrainConfig`:
    beta, desirable_weight, undesirable_weight), and returns per-pair losses (B,) and the
    chosen and rejected rewards (B,) that the metrics report. It is None for the DPO family
    (`LOSS_TYPES`): the trainer calls `dpo_loss` itself.
    """

    fn: Callable | None
    needs_reference: bool
    paper: str


def _kto_pairs(policy, reference, lengths, config):
    """KTO on pairs: each chosen response is a desirable example, each rejected one not.

    The reference point z0 is estimated from the batch's own 2B completions rather than from
    mismatched (prompt, other completion) pairs as in the paper and TRL: one forward pass less,
    at the price of a biased estimate (the matched log-ratios are the ones being trained).
    Unpaired data (`data.collate_unpaired`) gets the paper's estimate. A pair's loss is the
    mean of its two examples' losses.
    """
    b = policy.chosen.shape[0]
    policy, reference = torch.cat(tuple(policy)), torch.cat(tuple(reference))
    desirable = torch.arange(2 * b, device=policy.device) < b
    losses, rewards, _ = kto_loss(policy, reference, desirable, policy, reference,
                                  beta=config.beta, lambda_d=config.desirable_weight,
                                  lambda_u=config.undesirable_weight)
    return (losses[:b] + losses[b:]) / 2, rewards[:b], rewards[b:]


def _orpo_pairs(policy, reference, lengths, config):
    """ORPO with beta as its odds-ratio weight lambda (as TRL's ORPOConfig does).

    The rewards reported are beta times the per-token average log-likelihoods, as in TRL.
    """
    beta = config.beta
    losses, _, _ = orpo_loss(policy.chosen, policy.rejected, lengths.chosen, lengths.rejected,
                             lambda_or=beta)
    return (losses, beta * (policy.chosen / lengths.chosen).detach(),
            beta * (policy.rejected / lengths.rejected).detach())


def _sft_pairs(policy, reference, lengths, config):
    """Preferred-FT, the DPO paper's baseline (Sec. 6): the negative log-likelihood per token of
    the chosen response, -log pi(y_w | x) / |y_w|; the rejected response is not trained.

    The rewards reported are the per-token average log-likelihoods, so rewards/accuracies says
    how often the chosen response is the likelier one.
    """
    chosen = policy.chosen / lengths.chosen
    return -chosen, chosen.detach(), (policy.rejected / lengths.rejected).detach()


# Each loss's paper. The first six are dpo_loss's forms (LOSS_TYPES); KTO and ORPO have their
# own functions and are adapted to pairs here; "sft" is the paper's Preferred-FT baseline.
PAPERS = {"sigmoid": "DPO, arXiv 2305.18290 (Eq 7)", "robust": "robust DPO, arXiv 2403.00409",
          "ipo": "IPO, arXiv 2310.12036", "hinge": "SLiC-HF, arXiv 2305.10425",
          "simpo": "SimPO, arXiv 2405.14734",
          "unweighted": "DPO's gradient without its weight (teaching only)",
          "kto": "KTO, arXiv 2402.01306", "orpo": "ORPO, arXiv 2403.07691",
          "sft": "Preferred-FT, the baseline of DPO, arXiv 2305.18290 (Sec. 6)"}
LOSSES = {
    **{name: PreferenceLoss(None, name not in _NO_REFERENCE, PAPERS[name])
       for name in LOSS_TYPES},
    "kto": PreferenceLoss(_kto_pairs, True, PAPERS["kto"]),
    "orpo": PreferenceLoss(_orpo_pairs, False, PAPERS["orpo"]),
    "sft": PreferenceLoss(_sft_pairs, False, PAPERS["sft"]),
}


def check_loss_settings(loss_type: str, beta: float, label_smoothing: float) -> None:
    """Raise ValueError for an unknown loss or settings it cannot use (checked once, up front)."""
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}: use one of {', '.join(LOSSES)}.")
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number > 0, got {beta}: beta is the KL "
                         "weight (try 0.1).")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"label_smoothing must be in [0, 0.5), got {label_smoothing}: it is the assumed "
            "probability that a preference label is flipped (try 0.1).")
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing applies to 'sigmoid' and 'robust', not {loss_type!r}.")
