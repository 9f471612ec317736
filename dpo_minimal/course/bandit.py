"""Tabular lab: one prompt, K responses, a softmax policy. DPO and RLHF where everything is exact.

Policies are 1-D probability tensors over the K responses; pairs are index tensors (winners,
losers). Used by notebooks 01, 02, 03 and 06.
"""

import torch
import torch.nn.functional as F

from ..losses import dpo_loss


def optimal_policy(pi_ref: torch.Tensor, reward: torch.Tensor, beta: float) -> torch.Tensor:
    """pi*(y) = pi_ref(y) exp(r(y) / beta) / Z, the maximiser of E_pi[r] - beta KL(pi || pi_ref).

    Computed as a softmax of log pi_ref + r / beta, so large r / beta does not overflow.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}.")
    if pi_ref.shape != reward.shape or pi_ref.dim() != 1:
        raise ValueError(f"pi_ref and reward must be 1-D of one shape, got {tuple(pi_ref.shape)} "
                         f"and {tuple(reward.shape)}.")
    return torch.softmax(pi_ref.log() + reward / beta, dim=-1)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_y p(y) log p(y)/q(y), with 0 log 0 = 0."""
    return torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum(-1)


def expected_reward(pi: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
    return (pi * reward).sum(-1)


def objective(pi: torch.Tensor, pi_ref: torch.Tensor, reward: torch.Tensor, beta: float):
    """The KL-regularised RLHF objective (Eq 3): E_pi[r] - beta KL(pi || pi_ref)."""
    return expected_reward(pi, reward) - beta * kl(pi, pi_ref)


def sample_preferences(reward: torch.Tensor, n_pairs: int, pi_ref: torch.Tensor | None = None,
                       deterministic: bool = False, seed: int = 0):
    """Draw n_pairs comparisons of two distinct responses, labelled by Bradley-Terry.

    The two responses are drawn from `pi_ref` (uniform if None), as an offline data set would be.
    The first wins with probability sigma(r_a - r_b); with `deterministic`, the higher reward
    always wins. Returns (winners, losers), LongTensors of shape (n_pairs,).
    """
    g = torch.Generator().manual_seed(seed)
    k = reward.shape[0]
    probs = torch.full((k,), 1.0 / k) if pi_ref is None else pi_ref.detach().float()
    a = torch.multinomial(probs, n_pairs, replacement=True, generator=g)
    b = torch.multinomial(probs, n_pairs, replacement=True, generator=g)
    while (same := a == b).any():  # resample ties: a response is not compared with itself
        b[same] = torch.multinomial(probs, int(same.sum()), replacement=True, generator=g)
    if deterministic:
        a_wins = reward[a] > reward[b]
    else:
        a_wins = torch.rand(n_pairs, generator=g) < torch.sigmoid(reward[a] - reward[b])
    return torch.where(a_wins, a, b), torch.where(a_wins, b, a)


def bt_nll(scores: torch.Tensor, winners: torch.Tensor, losers: torch.Tensor) -> torch.Tensor:
    """Reward-model loss (Eq 2): -mean log sigma(r(y_w) - r(y_l))."""
    return -F.logsigmoid(scores[winners] - scores[losers]).mean()


def fit_bradley_terry(winners: torch.Tensor, losers: torch.Tensor, n_items: int,
                      steps: int = 200) -> torch.Tensor:
    """Maximum-likelihood Bradley-Terry scores from comparisons, centred to mean zero.

    Minimises Eq 2 with L-BFGS. Scores are identified only up to a shift (BT sees differences),
    hence the centring.
    """
    scores = torch.zeros(n_items, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([scores], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = bt_nll(scores, winners, losers)
        loss.backward()
        return loss

    opt.step(closure)
    fitted = scores.detach()
    return (fitted - fitted.mean()).float()


def train_tabular(pi_ref: torch.Tensor, winners: torch.Tensor, losers: torch.Tensor,
                  beta: float, loss_type: str = "sigmoid", steps: int = 2000, lr: float = 1.0,
                  record_every: int = 10):
    """Fit a softmax policy to pairs with a preference loss (full-batch gradient descent).

    The logits start at log pi_ref, so the policy starts at the reference. `loss_type` is any of
    `dpo_loss`'s; "unweighted" drops DPO's sigma weight. Returns (pi, history) where history is
    a list of dicts: step, loss, pi (a copy), logit_norm, margin (mean beta h over the pairs).
    """
    # log_softmax of log pi_ref equals log pi_ref up to rounding; use it on both sides so the
    # policy equals the reference exactly at step 0 and the first loss is exactly ln 2.
    ref_logps = torch.log_softmax(pi_ref.log(), -1)
    logits = ref_logps.clone().requires_grad_(True)
    # Plain gradient descent: Adam would rescale each logit's step and hide the shape of the
    # gradient, which is what the weighted-vs-unweighted comparison is about.
    opt = torch.optim.SGD([logits], lr=lr)
    ones = torch.ones(winners.shape[0])
    history = []
    for step in range(steps + 1):
        logps = torch.log_softmax(logits, -1)
        losses, chosen_r, rejected_r = dpo_loss(
            logps[winners], logps[losers], ref_logps[winners], ref_logps[losers], beta=beta,
            loss_type=loss_type, chosen_lengths=ones, rejected_lengths=ones,
        )
        loss = losses.mean()
        if step % record_every == 0 or step == steps:
            history.append({
                "step": step,
                "loss": loss.item(),
                "pi": logps.detach().exp(),
                # Softmax ignores a shift of the logits, so measure the norm without it.
                "logit_norm": (logits - logits.mean()).norm().item(),
                "margin": (chosen_r - rejected_r).mean().item(),
            })
        if step < steps:
            opt.zero_grad()
            loss.backward()
            opt.step()
    return torch.softmax(logits.detach(), -1), history


def rlhf_exact(pi_ref: torch.Tensor, winners: torch.Tensor, losers: torch.Tensor,
               beta: float) -> torch.Tensor:
    """Classic RLHF on the bandit: (i) fit a BT reward model, (ii) its exact KL-optimal policy."""
    reward_hat = fit_bradley_terry(winners, losers, pi_ref.shape[0])
    return optimal_policy(pi_ref, reward_hat, beta)


def rlhf_policy_gradient(pi_ref: torch.Tensor, reward: torch.Tensor, beta: float,
                         steps: int = 2000, samples: int = 64, lr: float = 0.05, seed: int = 0):
    """Maximise E_pi[r] - beta KL(pi || pi_ref) by REINFORCE, sampling from the policy itself.

    Each step draws `samples` responses y ~ pi, scores each with r(y) - beta log pi(y)/pi_ref(y)
    (the per-sample KL-penalised reward, as PPO-style RLHF does) and follows the score-function
    gradient with a mean baseline. Returns the final policy.
    """
    g = torch.Generator().manual_seed(seed)
    ref_logps = pi_ref.log()
    logits = ref_logps.clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    for _ in range(steps):
        logps = torch.log_softmax(logits, -1)
        y = torch.multinomial(logps.detach().exp(), samples, replacement=True, generator=g)
        score = (reward[y] - beta * (logps[y] - ref_logps[y])).detach()
        loss = -((score - score.mean()) * logps[y]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.softmax(logits.detach(), -1)


def online_dpo(pi_ref: torch.Tensor, reward: torch.Tensor, beta: float, rounds: int = 5,
               pairs_per_round: int = 200, steps: int = 500, lr: float = 1.0,
               loss_type: str = "sigmoid", winners: torch.Tensor | None = None,
               losers: torch.Tensor | None = None, seed: int = 0):
    """On-policy (iterative) DPO: sample from the current policy, get labels, refit, repeat.

    Each round draws `pairs_per_round` pairs from the current policy (on-policy), labels them
    by Bradley-Terry with the true `reward` (the labeller, who can judge any response, even one
    that no data set contains), adds them to the pool (which may start from an offline set
    `winners`, `losers`) and refits `train_tabular` on the whole pool from pi_ref. The reference
    stays pi_ref throughout, so the target is still pi* = optimal_policy(pi_ref, reward, beta).

    Returns (pi, history): history has one dict per round (0 = before any on-policy data):
    round, n_pairs, pi (a copy), and seen, a bool tensor (K,) of the responses in the pool.
    """
    k = pi_ref.shape[0]
    if (winners is None) != (losers is None):
        raise ValueError("pass both winners and losers (an offline starting pool), or neither.")
    if winners is None:
        winners = losers = torch.empty(0, dtype=torch.long)
    seen = torch.zeros(k, dtype=torch.bool)
    seen[winners] = True
    seen[losers] = True
    pi = pi_ref.clone() if winners.numel() == 0 else train_tabular(
        pi_ref, winners, losers, beta, loss_type=loss_type, steps=steps, lr=lr,
        record_every=steps)[0]
    history = [{"round": 0, "n_pairs": winners.numel(), "pi": pi.clone(), "seen": seen.clone()}]
    for r in range(1, rounds + 1):
        # A fresh seed per round: the same call gives the same run, rounds differ.
        w, lo = sample_preferences(reward, pairs_per_round, pi_ref=pi, seed=seed * 1000 + r)
        winners, losers = torch.cat([winners, w]), torch.cat([losers, lo])
        seen[w] = True
        seen[lo] = True
        pi, _ = train_tabular(pi_ref, winners, losers, beta, loss_type=loss_type, steps=steps,
                              lr=lr, record_every=steps)
        history.append({"round": r, "n_pairs": winners.numel(), "pi": pi.clone(),
                        "seen": seen.clone()})
    return pi, history
