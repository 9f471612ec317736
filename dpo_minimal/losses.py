"""The DPO loss and its family, from per-sequence log-probabilities."""

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "simpo", "unweighted")
_NEEDS_LENGTHS = ("ipo", "simpo")


def _check(tensors: dict, loss_type: str, beta: float, label_smoothing: float) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}: use one of {', '.join(LOSS_TYPES)}.")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}: beta is the KL weight (try 0.1).")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"label_smoothing must be in [0, 0.5), got {label_smoothing}: it is the assumed "
            "probability that a preference label is flipped (try 0.1)."
        )
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing applies to 'sigmoid' and 'robust', not {loss_type!r}.")
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(f"all inputs must be 1-D tensors of the same shape (B,), got {shapes}.")


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
    eps = label_smoothing
    chosen_ratio = policy_chosen_logps - reference_chosen_logps  # log pi/pi_ref (y_w)
    rejected_ratio = policy_rejected_logps - reference_rejected_logps  # log pi/pi_ref (y_l)
    if loss_type in _NEEDS_LENGTHS:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss_type={loss_type!r} averages per token: pass chosen_lengths "
                             "and rejected_lengths (response token counts).")
        if (chosen_lengths <= 0).any() or (rejected_lengths <= 0).any():
            raise ValueError("chosen_lengths and rejected_lengths must be positive.")
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
